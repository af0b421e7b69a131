//! The DINO model as a user holds it: a student and its EMA teacher, with inference helpers
//! (features, attention maps), saving/loading and loading official backbones.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Result as CResult, Tensor};
use serde_json::json;

use crate::checkpoint;
use crate::error::{Error, Result};
use crate::model::{HeadConfig, MultiCropWrapper, ParamStore, VitConfig};

/// Student and EMA teacher (same architecture; the teacher has no stochastic depth).
pub struct Dino {
    pub vit: VitConfig,
    pub head: Option<HeadConfig>,
    pub student_store: ParamStore,
    pub teacher_store: ParamStore,
    pub student: MultiCropWrapper,
    pub teacher: MultiCropWrapper,
    /// The same networks over detached views of the same weights, for forward passes that need no
    /// gradient (inference, the teacher in training): nothing is kept for a backward pass.
    pub student_nograd: MultiCropWrapper,
    pub teacher_nograd: MultiCropWrapper,
    pub device: Device,
    /// The compute dtype of inference: F32, or BF16 for mixed precision ([`crate::ops::autocast`]).
    /// Parameters are f32 either way; a trainer has its own setting.
    pub dtype: DType,
}

impl Dino {
    /// A freshly initialised student (seeded) and a teacher starting as its copy; or both from
    /// `weights` (names `backbone.*` / `head.*`) when given.
    pub fn new(
        vit: VitConfig,
        head: Option<HeadConfig>,
        seed: u64,
        weights: Option<HashMap<String, Tensor>>,
        device: &Device,
    ) -> CResult<Self> {
        let student_store = match weights {
            Some(w) => ParamStore::from_tensors(w, seed)?,
            None => ParamStore::new(seed),
        };
        let student = MultiCropWrapper::new(&vit, head.as_ref(), student_store.var_builder(device))?;
        let copies = student_store
            .tensors()
            .into_iter()
            .map(|(n, t)| Ok((n, t.copy()?)))
            .collect::<CResult<HashMap<_, _>>>()?;
        let teacher_store = ParamStore::from_tensors(copies, seed)?;
        let teacher_vit = VitConfig {
            drop_path_rate: 0.0,
            ..vit.clone()
        };
        let teacher = MultiCropWrapper::new(&teacher_vit, head.as_ref(), teacher_store.var_builder(device))?;
        let student_nograd = MultiCropWrapper::new(&vit, head.as_ref(), student_store.detached_builder(device))?;
        let teacher_nograd =
            MultiCropWrapper::new(&teacher_vit, head.as_ref(), teacher_store.detached_builder(device))?;
        Ok(Self {
            student_nograd,
            teacher_nograd,
            vit,
            head,
            student_store,
            teacher_store,
            student,
            teacher,
            device: device.clone(),
            dtype: DType::F32,
        })
    }

    /// Student parameters the optimiser updates (all but a fixed `weight_g`), in creation order.
    pub fn trainable(&self) -> Vec<(String, candle_core::Var)> {
        self.student_store
            .vars()
            .into_iter()
            .filter(|(n, _)| {
                !(self.head.as_ref().is_some_and(|h| h.norm_last_layer) && n.ends_with("last_layer.weight_g"))
            })
            .collect()
    }
}

impl Dino {
    /// The graph-free network for inference.
    fn wrapper(&self, teacher: bool) -> &MultiCropWrapper {
        if teacher {
            &self.teacher_nograd
        } else {
            &self.student_nograd
        }
    }

    fn check_crops(&self, crops: &Tensor) -> Result<()> {
        let dims = crops.dims();
        let p = self.vit.patch_size;
        if dims.len() != 4
            || dims[1] != 3
            || !dims[2].is_multiple_of(p)
            || !dims[3].is_multiple_of(p)
            || dims[2] == 0
            || dims[3] == 0
        {
            return Err(Error::Shape(format!(
                "crops must be (N, 3, H, W) with H and W positive multiples of the patch size {p}, got {dims:?}"
            )));
        }
        Ok(())
    }

    /// CLS features `(N, D)` of normalised crops, eval mode (no stochastic depth).
    pub fn features(&self, crops: &Tensor, teacher: bool) -> Result<Tensor> {
        self.check_crops(crops)?;
        // On the dino_rs pool: gemm then splits work over its threads, not rayon's global pool
        // (which, among other things, a fork()ed child inherits without threads).
        crate::parallel::install(|| {
            crate::ops::no_grad(|| {
                crate::ops::autocast::autocast(self.dtype, || {
                    Ok(self
                        .wrapper(teacher)
                        .backbone
                        .forward_t::<rand_chacha::ChaCha8Rng>(crops, None)?
                        .detach()
                        .to_dtype(DType::F32)?)
                })
            })
        })
    }

    /// Last-block CLS→patch attention `(N, heads, H/p, W/p)`.
    pub fn attention(&self, crops: &Tensor, teacher: bool) -> Result<Tensor> {
        self.check_crops(crops)?;
        let (n, _, h, w) = crops.dims4()?;
        if n == 0 {
            let p = self.vit.patch_size;
            return Ok(Tensor::zeros(
                (0, self.vit.num_heads, h / p, w / p),
                DType::F32,
                &self.device,
            )?);
        }
        crate::parallel::install(|| {
            crate::ops::no_grad(|| {
                crate::ops::autocast::autocast(self.dtype, || {
                    Ok(self
                        .wrapper(teacher)
                        .backbone
                        .cls_attention_maps(crops)?
                        .detach()
                        .to_dtype(DType::F32)?)
                })
            })
        })
    }

    fn meta(&self) -> serde_json::Value {
        json!({"format": "dino_rs.model", "version": 1, "vit": self.vit, "head": self.head})
    }

    /// Student and teacher weights (`student.*`, `teacher.*`) plus the configuration.
    pub fn save(&self, path: &Path) -> Result<()> {
        checkpoint::save(path, &self.named_tensors(), &self.meta())
    }

    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (prefix, store) in [("student.", &self.student_store), ("teacher.", &self.teacher_store)] {
            out.extend(
                store
                    .vars()
                    .into_iter()
                    .map(|(n, v)| (format!("{prefix}{n}"), v.as_tensor().clone())),
            );
        }
        out
    }

    /// A model saved by [`Dino::save`] (or a trainer checkpoint, which holds the same entries).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let (tensors, meta) = checkpoint::load(path)?;
        Self::from_saved(path, tensors, &meta, device)
    }

    pub fn from_saved(
        path: &Path,
        tensors: HashMap<String, Tensor>,
        meta: &serde_json::Value,
        device: &Device,
    ) -> Result<Self> {
        let bad = |m: String| Error::checkpoint(path, m);
        if meta["format"] == "dino_rs.backbone" {
            return Err(bad(
                "a backbone written by export_backbone (teacher backbone, no head): load it with dino_rs.load_backbone"
                    .into(),
            ));
        }
        let vit: VitConfig = serde_json::from_value(meta["vit"].clone()).map_err(|e| {
            bad(format!(
                "not a dino_rs model or checkpoint (no model configuration: {e})"
            ))
        })?;
        let head: Option<HeadConfig> = serde_json::from_value(meta["head"].clone()).map_err(|e| bad(e.to_string()))?;
        // The metadata sizes every layer: refuse nonsense before building anything from it.
        vit.validate()
            .and_then(|_| head.as_ref().map_or(Ok(()), HeadConfig::validate))
            .map_err(|e| bad(format!("invalid model configuration: {e}")))?;
        let mut student = HashMap::new();
        let mut teacher = HashMap::new();
        for (k, t) in tensors {
            if let Some(n) = k.strip_prefix("student.") {
                student.insert(n.to_string(), t.to_device(device)?);
            } else if let Some(n) = k.strip_prefix("teacher.") {
                teacher.insert(n.to_string(), t.to_device(device)?);
            }
        }
        let dino = Self::new(vit, head, 0, Some(student), device)
            .map_err(|e| bad(format!("weights do not fit the saved architecture: {e}")))?;
        for (name, var) in dino.teacher_store.vars() {
            let t = teacher
                .get(&name)
                .ok_or_else(|| bad(format!("teacher weight {name} is missing")))?;
            if t.shape() != var.shape() {
                return Err(bad(format!(
                    "teacher weight {name} has shape {:?}, expected {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
            var.set(t)?;
        }
        if let Some(name) = dino.student_store.unused().first() {
            return Err(bad(format!(
                "unexpected weight {name}: the file holds another architecture"
            )));
        }
        Ok(dino)
    }

    /// The teacher backbone with the official key names (`cls_token`, `blocks.0.attn.qkv.weight`,
    /// ...), loadable by the official `vision_transformer.py` and timm.
    pub fn export_backbone(&self, path: &Path) -> Result<()> {
        let tensors: Vec<(String, Tensor)> = self
            .teacher_store
            .vars()
            .into_iter()
            .filter_map(|(n, v)| {
                n.strip_prefix("backbone.")
                    .map(|s| (s.to_string(), v.as_tensor().clone()))
            })
            .collect();
        checkpoint::save(path, &tensors, &json!({"format": "dino_rs.backbone", "vit": self.vit}))
    }

    /// A backbone from official DINO weights (`.pth` state dict or full training checkpoint, or
    /// safetensors with the same keys). The architecture is read off the tensor shapes; heads
    /// default to embed_dim / 64 as in every official model.
    pub fn load_backbone(path: &Path, num_heads: Option<usize>, device: &Device) -> Result<Self> {
        let raw = checkpoint::load_weights(path)?;
        // Our own exports record the architecture; the shapes cannot tell the number of heads.
        let saved_heads = checkpoint::load(path)
            .ok()
            .and_then(|(_, meta)| meta["vit"]["num_heads"].as_u64());
        let num_heads = num_heads.or(saved_heads.map(|h| h as usize));
        let mut w: HashMap<String, Tensor> = HashMap::new();
        for (k, t) in raw {
            let k = k.strip_prefix("module.").unwrap_or(&k);
            let k = k.strip_prefix("backbone.").unwrap_or(k);
            if !k.starts_with("head.") {
                w.insert(format!("backbone.{k}"), t.to_dtype(DType::F32)?.to_device(device)?);
            }
        }
        let bad = |m: String| Error::checkpoint(path, m);
        let need = |k: &str| {
            w.get(&format!("backbone.{k}"))
                .ok_or_else(|| bad(format!("missing key {k}: not a DINO ViT backbone")))
        };
        let pe = need("patch_embed.proj.weight")?.dims().to_vec();
        let pos = need("pos_embed")?.dims().to_vec();
        need("cls_token")?;
        // pos_embed holds the CLS position and at least one patch position.
        if pe.len() != 4 || pos.len() != 3 || pos[1] < 2 || pe[2] != pe[3] {
            return Err(bad(format!(
                "unexpected shapes patch_embed.proj.weight {pe:?}, pos_embed {pos:?}"
            )));
        }
        let (embed_dim, patch) = (pe[0], pe[2]);
        let grid = ((pos[1] - 1) as f64).sqrt() as usize;
        let depth = (0..)
            .take_while(|i| w.contains_key(&format!("backbone.blocks.{i}.norm1.weight")))
            .count();
        let heads = num_heads.unwrap_or((embed_dim / 64).max(1));
        let vit = VitConfig::custom(embed_dim, depth, heads, patch, grid * patch);
        vit.validate()?;
        let dino =
            Self::new(vit, None, 0, Some(w), device).map_err(|e| bad(format!("not a usable ViT backbone: {e}")))?;
        if let Some(name) = dino.student_store.unused().first() {
            return Err(bad(format!("unexpected weight {name}: not a plain DINO ViT backbone")));
        }
        Ok(dino)
    }
}
