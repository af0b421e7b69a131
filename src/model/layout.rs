//! The key layouts published DINO and DINOv2 backbones come in, and the conversions between them
//! and the official names this crate's modules use (`cls_token`, `blocks.0.attn.qkv.weight`, ...).
//!
//! * **official**: the facebookresearch `.pth` files: bare backbones, or training checkpoints whose
//!   `teacher`/`student` entries carry `module.` and `backbone.` prefixes and a `head.`; DINOv2's
//!   may group its blocks into chunks (`blocks.<chunk>.<i>.`) and holds an unused `mask_token`.
//! * **timm**: DINO's names, except that its DINOv2 ViT-g calls the SwiGLU layers `mlp.fc1`/`fc2`,
//!   and its `_reg` models name the registers `reg_token` and fold the CLS token's position
//!   embedding into `cls_token`, keeping only the patches' positions (`no_embed_class`).
//! * **hf**: Hugging Face transformers' `ViTModel` (DINO) and `Dinov2Model` /
//!   `Dinov2WithRegistersModel`: `embeddings.*`, `encoder.layer.<i>.*` with the attention's
//!   query, key and value as three layers, `layernorm.*`.
//!
//! Reading detects the layout from the keys. Writing converts exactly: the only arithmetic is
//! timm's fold of the CLS position into `cls_token` (one f32 add, the one the forward pass
//! makes), and reading it back puts that sum in `cls_token` with a zero CLS position, which gives
//! the same tokens bit for bit.

use std::collections::HashMap;

use candle_core::{Result, Tensor};

use super::vit::{Family, Ffn, VitConfig};

/// A published key layout (see the module comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Official,
    Timm,
    Hf,
}

impl Layout {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "official" => Some(Self::Official),
            "timm" => Some(Self::Timm),
            "hf" => Some(Self::Hf),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Official => "official",
            Self::Timm => "timm",
            Self::Hf => "hf",
        }
    }
}

/// Weights in any layout, as official backbone names. Heads (DINO's `head.`, transformers'
/// `pooler.`/`classifier.`, timm's `head.`) and DINOv2's `mask_token` are dropped: a backbone
/// does not use them. Returns the layout detected.
pub fn to_official(weights: HashMap<String, Tensor>) -> std::result::Result<(Layout, HashMap<String, Tensor>), String> {
    let mut w = HashMap::with_capacity(weights.len());
    for (k, t) in weights {
        let mut k = k.as_str();
        for prefix in ["module.", "backbone.", "dinov2.", "vit."] {
            k = k.strip_prefix(prefix).unwrap_or(k);
        }
        w.insert(k.to_string(), t);
    }
    let swiglu = timm_swiglu(&w);
    let layout = if w
        .keys()
        .any(|k| k.starts_with("embeddings.") || k.starts_with("encoder.layer."))
    {
        Layout::Hf
    } else if w.contains_key("reg_token") || swiglu {
        Layout::Timm
    } else {
        Layout::Official
    };
    let mut out = HashMap::with_capacity(w.len());
    let mut qkv: HashMap<(usize, &'static str), [Option<Tensor>; 3]> = HashMap::new();
    for (k, t) in w {
        if ["head.", "pooler.", "classifier.", "fc_norm.", "norm_pre."]
            .iter()
            .any(|p| k.starts_with(p))
            || k == "mask_token"
            || k == "embeddings.mask_token"
        {
            continue;
        }
        let name = match layout {
            Layout::Official => unchunk(&k),
            Layout::Timm => timm_name(&k, swiglu),
            Layout::Hf => match hf_name(&k)? {
                HfName::Plain(n) => n,
                HfName::Qkv(block, part, what) => {
                    qkv.entry((block, what)).or_default()[part] = Some(t);
                    continue;
                }
            },
        };
        if out.insert(name.clone(), t).is_some() {
            return Err(format!("two weights map to {name}"));
        }
    }
    for ((block, what), parts) in qkv {
        let [Some(q), Some(k), Some(v)] = parts else {
            return Err(format!(
                "block {block}: the attention's query, key and value {what}s must all be present"
            ));
        };
        let t = Tensor::cat(&[q, k, v], 0).map_err(|e| e.to_string())?;
        out.insert(format!("blocks.{block}.attn.qkv.{what}"), t);
    }
    if layout == Layout::Timm {
        unfold_class_position(&mut out).map_err(|e| e.to_string())?;
    }
    Ok((layout, out))
}

/// Official backbone weights (as the model holds them) in `layout`'s names. DINOv2's official and
/// transformers layouts get the zero `mask_token` their modules expect.
pub fn from_official(weights: Vec<(String, Tensor)>, layout: Layout, vit: &VitConfig) -> Result<Vec<(String, Tensor)>> {
    let mut w: HashMap<String, Tensor> = weights.into_iter().collect();
    let d = vit.embed_dim;
    let mask_token = || Tensor::zeros((1, d), candle_core::DType::F32, &candle_core::Device::Cpu);
    let dinov2 = vit.family == Family::Dinov2;
    let mut out = Vec::with_capacity(w.len() + 1);
    match layout {
        Layout::Official => {
            if dinov2 {
                out.push(("mask_token".to_string(), mask_token()?));
            }
            out.extend(w);
        }
        Layout::Timm => {
            if let Some(reg) = w.remove("register_tokens") {
                // no_embed_class: the CLS position moves into the token, the grid stays.
                let pos = w.remove("pos_embed").expect("a ViT has pos_embed");
                let n = pos.dim(1)?;
                let cls = w.remove("cls_token").expect("a ViT has cls_token");
                out.push(("cls_token".to_string(), (cls + pos.narrow(1, 0, 1)?)?));
                out.push(("pos_embed".to_string(), pos.narrow(1, 1, n - 1)?));
                out.push(("reg_token".to_string(), reg));
            }
            for (k, t) in w {
                let k = k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.");
                out.push((k, t));
            }
        }
        Layout::Hf => {
            if dinov2 {
                out.push(("embeddings.mask_token".to_string(), mask_token()?));
            }
            for (k, t) in w {
                if let Some(rest) = k.strip_suffix(".weight").or_else(|| k.strip_suffix(".bias")) {
                    if let Some(block) = rest.strip_suffix(".attn.qkv") {
                        let what = &k[rest.len() + 1..];
                        let i = block.trim_start_matches("blocks.");
                        for (j, part) in ["query", "key", "value"].into_iter().enumerate() {
                            out.push((
                                format!("encoder.layer.{i}.attention.attention.{part}.{what}"),
                                t.narrow(0, j * d, d)?,
                            ));
                        }
                        continue;
                    }
                }
                out.push((hf_export_name(&k, dinov2), t));
            }
        }
    }
    Ok(out)
}

/// transformers' `config.json` for the model [`from_official`] writes in the hf layout.
pub fn hf_config(vit: &VitConfig) -> serde_json::Value {
    let common = serde_json::json!({
        "hidden_size": vit.embed_dim,
        "num_hidden_layers": vit.depth,
        "num_attention_heads": vit.num_heads,
        "patch_size": vit.patch_size,
        "image_size": vit.img_size,
        "num_channels": vit.in_chans,
        "hidden_act": "gelu",
        "layer_norm_eps": super::block::LN_EPS,
        "qkv_bias": true,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
    });
    let mut c = common.as_object().cloned().unwrap_or_default();
    // transformers' Dinov2Config validates mlp_ratio as an int (4, as published).
    let mlp_ratio = if vit.mlp_ratio.fract() == 0.0 {
        serde_json::json!(vit.mlp_ratio as u64)
    } else {
        serde_json::json!(vit.mlp_ratio)
    };
    let extra = match vit.family {
        Family::Dino => serde_json::json!({
            "model_type": "vit",
            "architectures": ["ViTModel"],
            "intermediate_size": vit.mlp_hidden(),
        }),
        Family::Dinov2 if vit.num_register_tokens > 0 => serde_json::json!({
            "model_type": "dinov2_with_registers",
            "architectures": ["Dinov2WithRegistersModel"],
            "num_register_tokens": vit.num_register_tokens,
            "mlp_ratio": mlp_ratio,
            "layerscale_value": 1.0,
            "use_swiglu_ffn": vit.ffn == Ffn::Swiglu,
            "drop_path_rate": 0.0,
        }),
        Family::Dinov2 => serde_json::json!({
            "model_type": "dinov2",
            "architectures": ["Dinov2Model"],
            "mlp_ratio": mlp_ratio,
            "layerscale_value": 1.0,
            "use_swiglu_ffn": vit.ffn == Ffn::Swiglu,
            "drop_path_rate": 0.0,
        }),
    };
    c.extend(extra.as_object().cloned().unwrap_or_default());
    serde_json::Value::Object(c)
}

/// timm names the SwiGLU layers fc1/fc2; its fc1 is then twice as wide as fc2's input.
fn timm_swiglu(w: &HashMap<String, Tensor>) -> bool {
    match (w.get("blocks.0.mlp.fc1.weight"), w.get("blocks.0.mlp.fc2.weight")) {
        (Some(a), Some(b)) => a.dims().first() == b.dims().get(1).map(|h| 2 * h).as_ref(),
        _ => false,
    }
}

fn timm_name(k: &str, swiglu: bool) -> String {
    if k == "reg_token" {
        return "register_tokens".into();
    }
    if swiglu {
        return k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.");
    }
    k.to_string()
}

/// After timm's `no_embed_class`: the position grid gets back a (zero) CLS row, the CLS token
/// keeps the sum it holds (see the module comment). Only when `pos_embed` has no CLS row: a
/// grid of patches is a square, 1 + a square is not.
fn unfold_class_position(w: &mut HashMap<String, Tensor>) -> Result<()> {
    let (Some(pos), Some(true)) = (w.get("pos_embed"), w.get("pos_embed").map(|p| p.rank() == 3)) else {
        return Ok(());
    };
    let n = pos.dim(1)?;
    let side = (n as f64).sqrt().round() as usize;
    if side * side == n {
        let zero = pos.narrow(1, 0, 1)?.zeros_like()?;
        let pos = Tensor::cat(&[&zero, pos], 1)?;
        w.insert("pos_embed".into(), pos);
    }
    Ok(())
}

/// `blocks.<chunk>.<i>.rest` (DINOv2's block chunks, `i` counting over all blocks) → `blocks.<i>.rest`.
fn unchunk(k: &str) -> String {
    if let Some(rest) = k.strip_prefix("blocks.") {
        let mut parts = rest.splitn(3, '.');
        if let (Some(a), Some(b), Some(tail)) = (parts.next(), parts.next(), parts.next()) {
            if a.parse::<usize>().is_ok() && b.parse::<usize>().is_ok() {
                return format!("blocks.{b}.{tail}");
            }
        }
    }
    k.to_string()
}

enum HfName {
    Plain(String),
    /// Block, part (0 query, 1 key, 2 value), "weight" or "bias".
    Qkv(usize, usize, &'static str),
}

/// One transformers key as the official name.
fn hf_name(k: &str) -> std::result::Result<HfName, String> {
    let plain = |s: &str| Ok(HfName::Plain(s.to_string()));
    match k {
        "embeddings.cls_token" => return plain("cls_token"),
        "embeddings.position_embeddings" => return plain("pos_embed"),
        "embeddings.register_tokens" => return plain("register_tokens"),
        "embeddings.patch_embeddings.projection.weight" => return plain("patch_embed.proj.weight"),
        "embeddings.patch_embeddings.projection.bias" => return plain("patch_embed.proj.bias"),
        "layernorm.weight" => return plain("norm.weight"),
        "layernorm.bias" => return plain("norm.bias"),
        _ => {}
    }
    let unknown = || format!("unexpected weight {k} in a transformers ViTModel/Dinov2Model layout");
    let rest = k.strip_prefix("encoder.layer.").ok_or_else(unknown)?;
    let (i, tail) = rest.split_once('.').ok_or_else(unknown)?;
    let i: usize = i.parse().map_err(|_| unknown())?;
    let (module, what) = tail.rsplit_once('.').ok_or_else(unknown)?;
    let what: &'static str = match what {
        "weight" => "weight",
        "bias" => "bias",
        "lambda1" => "gamma",
        _ => return Err(unknown()),
    };
    let part = match module {
        "attention.attention.query" => Some(0),
        "attention.attention.key" => Some(1),
        "attention.attention.value" => Some(2),
        _ => None,
    };
    if let Some(part) = part {
        return Ok(HfName::Qkv(i, part, what));
    }
    let official = match module {
        "layernorm_before" | "norm1" => "norm1",
        "layernorm_after" | "norm2" => "norm2",
        "attention.output.dense" => "attn.proj",
        "intermediate.dense" | "mlp.fc1" => "mlp.fc1",
        "output.dense" | "mlp.fc2" => "mlp.fc2",
        "mlp.weights_in" => "mlp.w12",
        "mlp.weights_out" => "mlp.w3",
        "layer_scale1" => "ls1",
        "layer_scale2" => "ls2",
        _ => return Err(unknown()),
    };
    Ok(HfName::Plain(format!("blocks.{i}.{official}.{what}")))
}

/// The transformers name of an official key other than qkv (`dinov2` picks Dinov2Model's names).
fn hf_export_name(k: &str, dinov2: bool) -> String {
    match k {
        "cls_token" => return "embeddings.cls_token".into(),
        "pos_embed" => return "embeddings.position_embeddings".into(),
        "register_tokens" => return "embeddings.register_tokens".into(),
        "patch_embed.proj.weight" => return "embeddings.patch_embeddings.projection.weight".into(),
        "patch_embed.proj.bias" => return "embeddings.patch_embeddings.projection.bias".into(),
        "norm.weight" => return "layernorm.weight".into(),
        "norm.bias" => return "layernorm.bias".into(),
        _ => {}
    }
    let Some((i, tail)) = k.strip_prefix("blocks.").and_then(|r| r.split_once('.')) else {
        return k.to_string();
    };
    let Some((module, what)) = tail.rsplit_once('.') else {
        return k.to_string();
    };
    let module = match (module, dinov2) {
        ("norm1", false) => "layernorm_before",
        ("norm2", false) => "layernorm_after",
        ("mlp.fc1", false) => "intermediate.dense",
        ("mlp.fc2", false) => "output.dense",
        ("attn.proj", _) => "attention.output.dense",
        ("mlp.w12", _) => "mlp.weights_in",
        ("mlp.w3", _) => "mlp.weights_out",
        ("ls1", _) => "layer_scale1",
        ("ls2", _) => "layer_scale2",
        (m, _) => m,
    };
    let what = if what == "gamma" { "lambda1" } else { what };
    format!("encoder.layer.{i}.{module}.{what}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn t(dims: &[usize], seed: f32) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37 + seed).sin()).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    fn backbone(family: Family, registers: usize, ffn: Ffn) -> (VitConfig, Vec<(String, Tensor)>) {
        let mut vit = VitConfig::custom(8, 2, 2, 14, 28);
        vit.family = family;
        vit.num_register_tokens = registers;
        vit.layer_scale = family == Family::Dinov2;
        vit.ffn = ffn;
        let h = vit.mlp_hidden();
        let mut w = vec![
            ("cls_token".to_string(), t(&[1, 1, 8], 0.1)),
            ("pos_embed".to_string(), t(&[1, 5, 8], 0.2)),
            ("patch_embed.proj.weight".to_string(), t(&[8, 3, 14, 14], 0.3)),
            ("patch_embed.proj.bias".to_string(), t(&[8], 0.4)),
            ("norm.weight".to_string(), t(&[8], 0.5)),
            ("norm.bias".to_string(), t(&[8], 0.6)),
        ];
        if registers > 0 {
            w.push(("register_tokens".into(), t(&[1, registers, 8], 0.7)));
        }
        for i in 0..2 {
            let b = |s: &str| format!("blocks.{i}.{s}");
            let s = i as f32;
            w.extend([
                (b("norm1.weight"), t(&[8], s + 1.0)),
                (b("norm1.bias"), t(&[8], s + 1.1)),
                (b("attn.qkv.weight"), t(&[24, 8], s + 1.2)),
                (b("attn.qkv.bias"), t(&[24], s + 1.3)),
                (b("attn.proj.weight"), t(&[8, 8], s + 1.4)),
                (b("attn.proj.bias"), t(&[8], s + 1.5)),
                (b("norm2.weight"), t(&[8], s + 1.6)),
                (b("norm2.bias"), t(&[8], s + 1.7)),
            ]);
            let (a, o, width) = match ffn {
                Ffn::Mlp => ("mlp.fc1", "mlp.fc2", h),
                Ffn::Swiglu => ("mlp.w12", "mlp.w3", 2 * h),
            };
            w.extend([
                (b(&format!("{a}.weight")), t(&[width, 8], s + 1.8)),
                (b(&format!("{a}.bias")), t(&[width], s + 1.9)),
                (b(&format!("{o}.weight")), t(&[8, h], s + 2.0)),
                (b(&format!("{o}.bias")), t(&[8], s + 2.1)),
            ]);
            if vit.layer_scale {
                w.extend([(b("ls1.gamma"), t(&[8], s + 2.2)), (b("ls2.gamma"), t(&[8], s + 2.3))]);
            }
        }
        (vit, w)
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn every_layout_reads_back_what_it_wrote() {
        for (family, registers, ffn) in [
            (Family::Dino, 0, Ffn::Mlp),
            (Family::Dinov2, 0, Ffn::Mlp),
            (Family::Dinov2, 4, Ffn::Mlp),
            (Family::Dinov2, 4, Ffn::Swiglu),
        ] {
            let (vit, w) = backbone(family, registers, ffn);
            for layout in [Layout::Official, Layout::Timm, Layout::Hf] {
                let written: HashMap<_, _> = from_official(w.clone(), layout, &vit).unwrap().into_iter().collect();
                let (found, read) = to_official(written).unwrap();
                let case = format!("{family:?} registers {registers} {ffn:?} {layout:?}");
                // timm's DINO and plain DINOv2 names are the official ones.
                let timm_is_official = layout == Layout::Timm && registers == 0 && ffn == Ffn::Mlp;
                assert_eq!(
                    found,
                    if timm_is_official { Layout::Official } else { layout },
                    "{case}"
                );
                assert_eq!(read.len(), w.len(), "{case}: {:?}", read.keys().collect::<Vec<_>>());
                for (k, v) in &w {
                    let got = read.get(k).unwrap_or_else(|| panic!("{case}: {k} missing"));
                    if layout == Layout::Timm && registers > 0 && (k == "cls_token" || k == "pos_embed") {
                        continue; // checked below: the fold moves the CLS position.
                    }
                    assert_eq!(values(got), values(v), "{case}: {k}");
                }
                if layout == Layout::Timm && registers > 0 {
                    // cls + pos[0] and the patch positions are what the forward pass adds up.
                    let pos = &w.iter().find(|(k, _)| k == "pos_embed").unwrap().1;
                    let cls = &w.iter().find(|(k, _)| k == "cls_token").unwrap().1;
                    let want_cls = (cls + pos.narrow(1, 0, 1).unwrap()).unwrap();
                    let got_pos = &read["pos_embed"];
                    assert_eq!(values(&read["cls_token"]), values(&want_cls), "{case}");
                    assert_eq!(values(&got_pos.narrow(1, 0, 1).unwrap()), vec![0.0; 8], "{case}");
                    assert_eq!(
                        values(&got_pos.narrow(1, 1, 4).unwrap()),
                        values(&pos.narrow(1, 1, 4).unwrap()),
                        "{case}"
                    );
                }
            }
        }
    }

    #[test]
    fn official_prefixes_chunks_heads_and_mask_token_are_read() {
        let (_, w) = backbone(Family::Dinov2, 0, Ffn::Mlp);
        let mut file: HashMap<String, Tensor> = w
            .iter()
            .map(|(k, v)| {
                let k = k
                    .replacen("blocks.1.", "blocks.1.1.", 1)
                    .replacen("blocks.0.", "blocks.0.0.", 1);
                (format!("module.backbone.{k}"), v.clone())
            })
            .collect();
        file.insert("module.head.last_layer.weight_g".into(), t(&[1, 4], 0.0));
        file.insert("mask_token".into(), t(&[1, 8], 0.0));
        let (layout, read) = to_official(file).unwrap();
        assert_eq!(layout, Layout::Official);
        let mut keys: Vec<_> = read.keys().cloned().collect();
        let mut want: Vec<_> = w.iter().map(|(k, _)| k.clone()).collect();
        keys.sort();
        want.sort();
        assert_eq!(keys, want);
    }

    #[test]
    fn a_partial_qkv_or_unknown_hf_key_is_refused() {
        let (vit, w) = backbone(Family::Dino, 0, Ffn::Mlp);
        let mut hf: HashMap<_, _> = from_official(w, Layout::Hf, &vit).unwrap().into_iter().collect();
        hf.remove("encoder.layer.1.attention.attention.key.bias");
        let err = to_official(hf.clone()).unwrap_err();
        assert!(err.contains("block 1") && err.contains("bias"), "{err}");
        hf.insert("encoder.layer.0.crossattention.weight".into(), t(&[1], 0.0));
        assert!(to_official(hf).unwrap_err().contains("unexpected weight"));
    }
}
