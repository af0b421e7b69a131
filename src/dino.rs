//! The DINO model as a user holds it: a student and its EMA teacher, with inference helpers
//! (features, attention maps), saving/loading and loading official backbones.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Result as CResult, Tensor};
use serde_json::json;

use crate::checkpoint;
use crate::error::{Error, Result};
use crate::model::layout::{self, Layout};
use crate::model::{Family, Ffn, HeadConfig, MultiCropWrapper, ParamStore, VitConfig};

/// Which features [`Dino::features_of`] gives per image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Features {
    /// The final-norm CLS token, `(D,)`: DINO's k-NN and linear evaluation input.
    Cls,
    /// The final-norm patch tokens, `(patches, D)`, registers left out: for segmentation and retrieval.
    Patch,
    /// The CLS token and the mean patch token, `(2·D,)`: DINOv2's linear evaluation input.
    ClsAvgpool,
}

impl Features {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "cls" => Some(Self::Cls),
            "patch" => Some(Self::Patch),
            "cls+avgpool" => Some(Self::ClsAvgpool),
            _ => None,
        }
    }

    /// The shape per image of an `h`×`w` crop.
    pub fn shape(self, vit: &VitConfig, h: usize, w: usize) -> Vec<usize> {
        let d = vit.embed_dim;
        match self {
            Self::Cls => vec![d],
            Self::Patch => vec![(h / vit.patch_size) * (w / vit.patch_size), d],
            Self::ClsAvgpool => vec![2 * d],
        }
    }
}

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
        self.features_of(crops, teacher, Features::Cls)
    }

    /// The features `kind` names of normalised crops, eval mode: `(N, D)` CLS tokens,
    /// `(N, patches, D)` patch tokens, or `(N, 2·D)` CLS and mean patch token side by side.
    pub fn features_of(&self, crops: &Tensor, teacher: bool, kind: Features) -> Result<Tensor> {
        self.check_crops(crops)?;
        let (_, _, h, w) = crops.dims4()?;
        let n = crops.dim(0)?;
        if n == 0 {
            let mut shape = vec![0];
            shape.extend(kind.shape(&self.vit, h, w));
            return Ok(Tensor::zeros(shape, DType::F32, &self.device)?);
        }
        let backbone = &self.wrapper(teacher).backbone;
        if kind == Features::Cls {
            return self.infer(|| backbone.forward_t::<rand_chacha::ChaCha8Rng>(crops, None));
        }
        let prefix = self.vit.num_prefix_tokens();
        let patches = (h / self.vit.patch_size) * (w / self.vit.patch_size);
        let tokens = self.infer(|| backbone.forward_tokens(crops))?;
        let patch = tokens.narrow(1, prefix, patches)?;
        Ok(match kind {
            Features::Patch => patch.contiguous()?,
            // DINOv2's linear evaluation input: the CLS token, then the patches' mean.
            _ => Tensor::cat(&[&tokens.narrow(1, 0, 1)?.squeeze(1)?, &patch.mean(1)?], 1)?,
        })
    }

    /// `f`'s output as f32 and detached, computed as inference: on the dino_rs pool (gemm then
    /// splits work over its threads, not rayon's global pool, which among other things a fork()ed
    /// child inherits without threads), keeping nothing for a backward pass, in the inference dtype.
    fn infer(&self, f: impl Fn() -> CResult<Tensor> + Send + Sync) -> Result<Tensor> {
        crate::parallel::install(|| {
            crate::ops::no_grad(|| {
                crate::ops::autocast::autocast(self.dtype, || Ok(f()?.detach().to_dtype(DType::F32)?))
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
        self.infer(|| self.wrapper(teacher).backbone.cls_attention_maps(crops))
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

    /// The teacher backbone in a published key layout ([`crate::model::layout`]), as safetensors:
    /// `official` (the facebookresearch names; also timm's for DINO), `timm`, or `hf`
    /// (transformers' ViTModel / Dinov2Model). For `hf`, `path` is a folder that receives
    /// `model.safetensors` and `config.json`, as `save_pretrained` writes them.
    pub fn export_backbone(&self, path: &Path, layout: Layout) -> Result<()> {
        let tensors: Vec<(String, Tensor)> = self
            .teacher_store
            .vars()
            .into_iter()
            .filter_map(|(n, v)| {
                n.strip_prefix("backbone.")
                    .map(|s| (s.to_string(), v.as_tensor().clone()))
            })
            .collect();
        let tensors = layout::from_official(tensors, layout, &self.vit)?;
        let meta = json!({"format": "dino_rs.backbone", "vit": self.vit, "layout": layout.name()});
        if layout != Layout::Hf {
            return checkpoint::save(path, &tensors, &meta);
        }
        std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
        let config =
            serde_json::to_vec_pretty(&layout::hf_config(&self.vit)).map_err(|e| Error::invalid(e.to_string()))?;
        checkpoint::write_atomic(&path.join("config.json"), &config)?;
        checkpoint::save(&path.join("model.safetensors"), &tensors, &meta)
    }

    /// A backbone from published weights in any layout [`layout::to_official`] reads: official
    /// DINO or DINOv2 `.pth` (bare or a training checkpoint), timm, or transformers (a
    /// `model.safetensors` / `pytorch_model.bin` file, or the folder holding it and its
    /// `config.json`), or safetensors written by [`Dino::export_backbone`]. The architecture
    /// is read off the tensors; heads come from `num_heads`, else the file's configuration, else
    /// embed_dim / 64 as in every published model.
    pub fn load_backbone(path: &Path, num_heads: Option<usize>, device: &Device) -> Result<Self> {
        let (file, config_heads) = weights_file(path)?;
        let raw = checkpoint::load_weights(&file)?;
        // Our own exports record the architecture; the shapes cannot tell the number of heads.
        let saved_heads = checkpoint::load(&file)
            .ok()
            .and_then(|(_, meta)| meta["vit"]["num_heads"].as_u64())
            .map(|h| h as usize);
        let num_heads = num_heads.or(config_heads).or(saved_heads);
        let bad = |m: String| Error::checkpoint(&file, m);
        let (_, mut w) = layout::to_official(raw).map_err(|e| bad(format!("not a ViT backbone: {e}")))?;
        let vit = infer_vit(&w, num_heads).map_err(bad)?;
        vit.validate()
            .map_err(|e| bad(format!("not a usable ViT backbone: {e}")))?;
        let w = w
            .drain()
            .map(|(k, t)| Ok((format!("backbone.{k}"), t.to_dtype(DType::F32)?.to_device(device)?)))
            .collect::<CResult<HashMap<_, _>>>()?;
        let dino =
            Self::new(vit, None, 0, Some(w), device).map_err(|e| bad(format!("not a usable ViT backbone: {e}")))?;
        if let Some(name) = dino.student_store.unused().first() {
            return Err(bad(format!(
                "unexpected weight {name}: not a DINO or DINOv2 ViT backbone"
            )));
        }
        Ok(dino)
    }
}

/// The weights file for `path` (a transformers folder: its `model.safetensors` or
/// `pytorch_model.bin`), and the number of heads a transformers `config.json` beside it names.
fn weights_file(path: &Path) -> Result<(std::path::PathBuf, Option<usize>)> {
    let dir = if path.is_dir() { Some(path) } else { None };
    let file = match dir {
        Some(d) => ["model.safetensors", "pytorch_model.bin"]
            .iter()
            .map(|n| d.join(n))
            .find(|f| f.is_file())
            .ok_or_else(|| Error::checkpoint(path, "a folder without model.safetensors or pytorch_model.bin"))?,
        None => path.to_path_buf(),
    };
    let config = file.with_file_name("config.json");
    let heads = match std::fs::read(&config) {
        Ok(bytes) => {
            let v: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| Error::checkpoint(&config, format!("not a JSON configuration: {e}")))?;
            v["num_attention_heads"].as_u64().map(|h| h as usize)
        }
        Err(_) => None,
    };
    Ok((file, heads))
}

/// The backbone's architecture, read off its (official-named) tensors.
fn infer_vit(w: &HashMap<String, Tensor>, num_heads: Option<usize>) -> std::result::Result<VitConfig, String> {
    let need = |k: &str| {
        w.get(k)
            .map(|t| t.dims().to_vec())
            .ok_or_else(|| format!("missing key {k}: not a DINO or DINOv2 ViT backbone"))
    };
    let pe = need("patch_embed.proj.weight")?;
    let pos = need("pos_embed")?;
    need("cls_token")?;
    // pos_embed holds the CLS position and a square grid of patch positions.
    let grid = pos.get(1).map(|&n| ((n.max(1) - 1) as f64).sqrt().round() as usize);
    if pe.len() != 4 || pos.len() != 3 || pe[2] != pe[3] || grid.is_none_or(|g| g == 0 || g * g + 1 != pos[1]) {
        return Err(format!(
            "unexpected shapes patch_embed.proj.weight {pe:?}, pos_embed {pos:?}"
        ));
    }
    let (embed_dim, patch, grid) = (pe[0], pe[2], grid.unwrap_or(1));
    let depth = (0..)
        .take_while(|i| w.contains_key(&format!("blocks.{i}.norm1.weight")))
        .count();
    let heads = num_heads.unwrap_or((embed_dim / 64).max(1));
    let mut vit = VitConfig::custom(embed_dim, depth, heads, patch, grid * patch);
    vit.num_register_tokens = match w.get("register_tokens") {
        Some(r) => r.dims().get(1).copied().ok_or("register_tokens must be (1, R, D)")?,
        None => 0,
    };
    vit.layer_scale = w.contains_key("blocks.0.ls1.gamma");
    // Every DINOv2 backbone has LayerScale; DINO's have none.
    if vit.layer_scale || vit.num_register_tokens > 0 {
        vit.family = Family::Dinov2;
    }
    // DINOv2's hub builds its `_reg` models with an antialiased, offset-free resize.
    if vit.num_register_tokens > 0 {
        vit.pos_interpolation = crate::model::pos_embed::PosInterpolation::Antialias;
    }
    if let Some(w12) = w.get("blocks.0.mlp.w12.weight") {
        vit.ffn = Ffn::Swiglu;
        let want = w12.dims().first().copied().unwrap_or(0) / 2;
        if vit.mlp_hidden() != want {
            return Err(format!(
                "a SwiGLU width of {want} is not DINOv2's for embed_dim {embed_dim} and mlp_ratio 4 ({})",
                vit.mlp_hidden()
            ));
        }
    } else if let Some(fc1) = w.get("blocks.0.mlp.fc1.weight") {
        vit.mlp_ratio = fc1.dims().first().copied().unwrap_or(0) as f64 / embed_dim as f64;
    }
    Ok(vit)
}
