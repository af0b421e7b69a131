//! Parameter storage: every trainable tensor is a named `Var`, created in construction order
//! from one seeded ChaCha stream (so a seed gives the same initial weights on every machine), or
//! taken from loaded tensors when a name is already present (checkpoints, official weights).
//! Student and teacher each own a store; the EMA pairs them by name.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::{Init, VarBuilder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

struct Inner {
    vars: HashMap<String, Var>,
    order: Vec<String>,
    rng: ChaCha8Rng,
    /// Loaded stores refuse to invent missing parameters.
    strict: bool,
    used: std::collections::HashSet<String>,
}

/// Named variables with deterministic initialisation.
pub struct ParamStore {
    inner: Mutex<Inner>,
}

impl ParamStore {
    pub fn new(seed: u64) -> Self {
        Self {
            inner: Mutex::new(Inner {
                vars: HashMap::new(),
                order: Vec::new(),
                rng: ChaCha8Rng::seed_from_u64(seed),
                strict: false,
                used: Default::default(),
            }),
        }
    }

    /// A store holding exactly `tensors`: a layer asking for a name not present is an error
    /// (loading must never silently initialise a missing weight).
    pub fn from_tensors(tensors: HashMap<String, Tensor>, seed: u64) -> candle_core::Result<Self> {
        let store = Self::new(seed);
        {
            let mut inner = store.lock();
            inner.strict = true;
            let mut tensors: Vec<_> = tensors.into_iter().collect();
            tensors.sort_by(|a, b| a.0.cmp(&b.0));
            for (name, t) in tensors {
                inner
                    .vars
                    .insert(name.clone(), Var::from_tensor(&t.to_dtype(DType::F32)?)?);
                inner.order.push(name);
            }
        }
        Ok(store)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Variables in creation order (stable across runs, unlike a HashMap).
    pub fn vars(&self) -> Vec<(String, Var)> {
        let inner = self.lock();
        inner
            .order
            .iter()
            .filter_map(|n| inner.vars.get(n).map(|v| (n.clone(), v.clone())))
            .collect()
    }

    /// Loaded names that no layer asked for (a sign of another architecture), sorted.
    pub fn unused(&self) -> Vec<String> {
        let inner = self.lock();
        let mut v: Vec<String> = inner
            .order
            .iter()
            .filter(|n| !inner.used.contains(*n))
            .cloned()
            .collect();
        v.sort();
        v
    }

    pub fn get(&self, name: &str) -> Option<Var> {
        self.lock().vars.get(name).cloned()
    }

    /// Current values, for saving.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.lock()
            .vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// A VarBuilder over detached views of the current variables: the same storage (every in-place
    /// update shows through), but layers built from it record no autograd graph, so inference
    /// frees each activation as soon as the next layer has used it.
    pub fn detached_builder(&self, device: &Device) -> VarBuilder<'static> {
        let views = self
            .lock()
            .vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect();
        VarBuilder::from_tensors(views, DType::F32, device)
    }

    /// A VarBuilder that creates or fetches variables in this store.
    pub fn var_builder<'a>(&'a self, device: &Device) -> VarBuilder<'a> {
        VarBuilder::from_backend(Box::new(StoreBackend(self)), DType::F32, device.clone())
    }
}

struct StoreBackend<'a>(&'a ParamStore);

fn init_tensor(init: Init, shape: &Shape, rng: &mut ChaCha8Rng, dev: &Device) -> candle_core::Result<Tensor> {
    let n = shape.elem_count();
    let data: Vec<f32> = match init {
        Init::Const(v) => vec![v as f32; n],
        Init::Randn { mean, stdev } => {
            let normal = Normal::new(mean, stdev).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            (0..n).map(|_| normal.sample(rng) as f32).collect()
        }
        Init::Uniform { lo, up } => (0..n).map(|_| (lo + (up - lo) * rng.random::<f64>()) as f32).collect(),
        Init::Kaiming { .. } => {
            return Err(candle_core::Error::Msg(
                "Kaiming init is not used by dino_rs layers".into(),
            ));
        }
    };
    Tensor::from_vec(data, shape, dev)
}

impl candle_nn::var_builder::SimpleBackend for StoreBackend<'_> {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let mut inner = self.0.lock();
        inner.used.insert(name.to_string());
        if let Some(v) = inner.vars.get(name) {
            if v.shape() != &s {
                return Err(candle_core::Error::Msg(format!(
                    "parameter {name} has shape {:?} but this model needs {:?}",
                    v.shape().dims(),
                    s.dims()
                )));
            }
            return v.as_tensor().to_dtype(dtype);
        }
        if inner.strict {
            return Err(candle_core::Error::Msg(format!(
                "weight {name} (shape {:?}) is missing",
                s.dims()
            )));
        }
        let t = init_tensor(h, &s, &mut inner.rng, dev)?;
        let var = Var::from_tensor(&t)?;
        inner.vars.insert(name.to_string(), var.clone());
        inner.order.push(name.to_string());
        var.as_tensor().to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        match self.0.lock().vars.get(name) {
            Some(v) => v.as_tensor().to_dtype(dtype),
            None => Err(candle_core::Error::Msg(format!("parameter {name} is missing"))),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.lock().vars.contains_key(name)
    }
}
