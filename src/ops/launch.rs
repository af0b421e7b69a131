//! How dino_rs launches its CUDA kernels (src/ops/cuda/*.cu), apart from CUDA itself: the grid and
//! block of each kernel and the parameter records of the multi-tensor updates. The CUDA build
//! launches with these; tests/cuda_emulated.rs runs the same kernels on the CPU with the same
//! shapes and records, so CI checks both without a GPU.

use candle_core::{Result, Tensor};

/// The scalars of one AdamW step, already as PyTorch forms them.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    /// 1 − lr·weight_decay
    pub decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// √(1 − β2^t)
    pub bias_correction2_sqrt: f64,
    pub eps: f64,
    /// lr / (1 − β1^t)
    pub step_size: f64,
}

/// One parameter's AdamW update: the parameter, its moments and gradient, and its step's scalars.
pub struct AdamWItem<'a> {
    pub param: &'a Tensor,
    pub m: &'a Tensor,
    pub v: &'a Tensor,
    pub grad: &'a Tensor,
    pub step: AdamWStep,
}

/// A kernel's grid and block, in blocks and threads per dimension (x, y, z).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub grid: [u32; 3],
    pub block: [u32; 3],
}

/// A grid-stride loop over `n` elements: 256 threads a block, at most 65,535 blocks, at least one
/// (CUDA refuses an empty grid; the loop then does nothing).
pub fn grid_stride(n: usize) -> Launch {
    let threads = 256u32;
    Launch {
        grid: [(n as u32).div_ceil(threads).clamp(1, 65_535), 1, 1],
        block: [threads, 1, 1],
    }
}

/// Rows per block of the row kernels (layer_norm.cu and softmax.cu's ROWS_PER_BLOCK), a warp each.
pub const ROWS_PER_BLOCK: usize = 8;

/// One warp per row, [`ROWS_PER_BLOCK`] rows a block; at least one block (with no rows the
/// kernels return at once).
pub fn row_blocks(rows: usize) -> Launch {
    Launch {
        grid: [rows.div_ceil(ROWS_PER_BLOCK).max(1) as u32, 1, 1],
        block: [32, ROWS_PER_BLOCK as u32, 1],
    }
}

/// Rows per tile of LayerNorm's backward column sums: each tile's partial sums are a row of
/// `tiles × d` scratch, summed in tile order by the last kernel.
pub const TILE_ROWS: usize = 256;

/// LayerNorm backward over `rows` rows of `d`: the number of tiles and the launches of its three
/// kernels (rows: dx and row statistics; cols: per-tile partial sums of dw, db; sum: the tiles).
pub fn layer_norm_backward(rows: usize, d: usize) -> (usize, [Launch; 3]) {
    let (tiles, [cols, sum]) = column_sums(rows, d);
    (tiles, [row_blocks(rows), cols, sum])
}

/// Column sums over `rows` rows of `d` in tiles of [`TILE_ROWS`] (bias.cu, and LayerNorm's dw and
/// db): the number of tiles and the launches of the per-tile kernel (32 columns a block) and of
/// the one adding the tiles.
pub fn column_sums(rows: usize, d: usize) -> (usize, [Launch; 2]) {
    let tiles = rows.div_ceil(TILE_ROWS).max(1);
    let cols = Launch {
        grid: [d.div_ceil(32).max(1) as u32, tiles as u32, 1],
        block: [32, ROWS_PER_BLOCK as u32, 1],
    };
    let sum = Launch {
        grid: [d.div_ceil(256).max(1) as u32, 1, 1],
        block: [256, 1, 1],
    };
    (tiles, [cols, sum])
}

/// Head dimension of the fused attention kernel (attention.cu's HEAD_DIM): ViT-S and ViT-B's.
pub const ATTENTION_HEAD_DIM: usize = 64;

/// attention.cu: a block of 4 warps per 64 queries of one (image, head).
pub fn attention(batch: usize, tokens: usize, heads: usize) -> Launch {
    Launch {
        grid: [tokens.div_ceil(64).max(1) as u32, (batch * heads) as u32, 1],
        block: [128, 1, 1],
    }
}

/// Elements per chunk of the multi-tensor updates: `CHUNK` in src/ops/cuda/update.cu.
pub const CHUNK: usize = 8192;

/// One block per chunk, 256 threads (dino_sumsq_foreach's reduction needs exactly that many).
pub fn foreach_blocks(chunks: u32) -> Launch {
    Launch {
        grid: [chunks, 1, 1],
        block: [256, 1, 1],
    }
}

/// The chunks of tensors of `lens` elements, tensor by tensor: `(tensor, first element)` for each,
/// and the index of each tensor's first chunk. Empty tensors have none.
pub fn chunk_table(lens: &[usize]) -> (Vec<[u32; 2]>, Vec<u32>) {
    let mut chunks = Vec::with_capacity(lens.iter().map(|n| n.div_ceil(CHUNK)).sum());
    let mut first = Vec::with_capacity(lens.len());
    for (t, &n) in lens.iter().enumerate() {
        first.push(chunks.len() as u32);
        chunks.extend((0..n).step_by(CHUNK).map(|start| [t as u32, start as u32]));
    }
    (chunks, first)
}

/// Records laid out as update.cu's structs, given each tensor's address by `ptr`: pointers first
/// (8-byte aligned), then 4-byte fields.
struct Records<F> {
    bytes: Vec<u8>,
    ptr: F,
}

impl<F: Fn(&Tensor) -> Result<u64>> Records<F> {
    fn new(ptr: F) -> Self {
        Self { bytes: Vec::new(), ptr }
    }
    fn ptr(&mut self, t: &Tensor) -> Result<&mut Self> {
        assert!(
            self.bytes.len().is_multiple_of(8),
            "update.cu's records put their pointers first"
        );
        let p = (self.ptr)(t)?;
        self.bytes.extend_from_slice(&p.to_le_bytes());
        Ok(self)
    }
    fn u32(&mut self, x: u32) -> &mut Self {
        self.bytes.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn f32(&mut self, x: f32) -> &mut Self {
        self.bytes.extend_from_slice(&x.to_le_bytes());
        self
    }
    /// The bytes, checked to be `count` records of `size` (the struct's `sizeof`).
    fn finish(self, count: usize, size: usize, what: &str) -> Result<Vec<u8>> {
        if self.bytes.len() != count * size {
            candle_core::bail!(
                "{what}: {} bytes written for {count} records of {size}",
                self.bytes.len()
            );
        }
        Ok(self.bytes)
    }
}

/// One `AdamWTensor` per item.
pub fn adamw_records(items: &[AdamWItem<'_>], ptr: impl Fn(&Tensor) -> Result<u64>) -> Result<Vec<u8>> {
    let mut rec = Records::new(ptr);
    for i in items {
        let [decay, inv_bc2, _, step] = i.step.kernel_scalars();
        rec.ptr(i.param)?.ptr(i.m)?.ptr(i.v)?.ptr(i.grad)?;
        rec.u32(i.param.elem_count() as u32).f32(decay).f32(inv_bc2).f32(step);
    }
    rec.finish(items.len(), 48, "adamw")
}

/// dino_adamw_foreach's scalar arguments after the tables: keep1 = 1 − β1, β2, keep2 = 1 − β2, eps.
pub fn adamw_scalars(s: &AdamWStep) -> [f32; 4] {
    [
        (1.0 - s.beta1) as f32,
        s.beta2 as f32,
        (1.0 - s.beta2) as f32,
        s.eps as f32,
    ]
}

/// One `EmaTensor` per `(teacher, student)`.
pub fn ema_records(pairs: &[(&Tensor, &Tensor)], ptr: impl Fn(&Tensor) -> Result<u64>) -> Result<Vec<u8>> {
    let mut rec = Records::new(ptr);
    for (t, s) in pairs {
        rec.ptr(t)?.ptr(s)?.u32(t.elem_count() as u32).u32(0);
    }
    rec.finish(pairs.len(), 24, "ema")
}

/// One `GradTensor` per gradient, with its range of chunks (`first`: from [`chunk_table`]).
pub fn grad_records(grads: &[&Tensor], first: &[u32], ptr: impl Fn(&Tensor) -> Result<u64>) -> Result<Vec<u8>> {
    let mut rec = Records::new(ptr);
    for (g, &first) in grads.iter().zip(first) {
        let n = g.elem_count();
        rec.ptr(g)?
            .u32(n as u32)
            .u32(first)
            .u32(n.div_ceil(CHUNK) as u32)
            .u32(0);
    }
    rec.finish(grads.len(), 24, "clip")
}

/// Parts per launch of pack.cu's `dino_pack_f32` (its PACK_PARTS): a transformer block's
/// parameters.
pub const PACK_PARTS: usize = 12;

/// pack.cu's `PackPart`: one tensor to copy into the packed buffer, from the device address `src`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackPart {
    pub src: u64,
    pub n: u32,
    pub offset: u32,
    pub bf16: u32,
    pub pad: u32,
}

/// pack.cu's `PackParts`, passed to the kernel by value: [`PACK_PARTS`] parts, the unused ones empty.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackParts {
    pub part: [PackPart; PACK_PARTS],
}

/// The parts `(address, elements, bf16)` one after another, the number of elements in all, and
/// the launch: a row of blocks per part, each row [`grid_stride`] over the longest part.
pub fn pack_parts(parts: &[(u64, usize, bool)]) -> Result<(PackParts, usize, Launch)> {
    if parts.is_empty() || parts.len() > PACK_PARTS {
        candle_core::bail!("pack: {} parts, expected 1 to {PACK_PARTS}", parts.len());
    }
    let mut packed = PackParts::default();
    let mut total = 0usize;
    for (p, &(src, n, bf16)) in packed.part.iter_mut().zip(parts) {
        if total + n > u32::MAX as usize {
            candle_core::bail!("pack: more than {} elements", u32::MAX);
        }
        *p = PackPart {
            src,
            n: n as u32,
            offset: total as u32,
            bf16: u32::from(bf16),
            pad: 0,
        };
        total += n;
    }
    let row = grid_stride(parts.iter().map(|p| p.1).max().unwrap_or(0));
    let launch = Launch {
        grid: [row.grid[0], parts.len() as u32, 1],
        ..row
    };
    Ok((packed, total, launch))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of `#define NAME value` in a kernel source (the leading integer).
    fn defined(source: &str, name: &str) -> usize {
        let line = source
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("#define {name} ")))
            .unwrap_or_else(|| panic!("no #define {name}"));
        let digits: String = line.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().unwrap_or_else(|_| panic!("#define {name} {line}"))
    }

    #[test]
    fn the_launch_shapes_are_the_kernels_own() {
        // Defined once on each side: the kernels index by theirs, the launches size by these.
        let common = include_str!("cuda/common.cuh");
        assert_eq!(defined(common, "ROWS_PER_BLOCK"), ROWS_PER_BLOCK);
        assert_eq!(defined(include_str!("cuda/pack.cu"), "PACK_PARTS"), PACK_PARTS);
        for (name, source) in [
            ("bias", include_str!("cuda/bias.cu")),
            ("layer_norm", include_str!("cuda/layer_norm.cu")),
            ("softmax", include_str!("cuda/softmax.cu")),
            ("weight_norm", include_str!("cuda/weight_norm.cu")),
        ] {
            assert!(source.contains("#include \"common.cuh\""), "{name}.cu");
            assert!(
                !source.contains("#define ROWS_PER_BLOCK"),
                "{name}.cu defines its own ROWS_PER_BLOCK"
            );
        }
    }

    #[test]
    fn the_chunk_table_covers_every_element_once_tensor_by_tensor() {
        let lens = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17, 0, 5];
        let (chunks, first) = chunk_table(&lens);
        assert_eq!(first.len(), lens.len());
        let mut seen: Vec<Vec<usize>> = lens.iter().map(|&n| vec![0; n]).collect();
        for (k, &[t, start]) in chunks.iter().enumerate() {
            let (t, start) = (t as usize, start as usize);
            assert!(start < lens[t], "chunk {k} starts past its tensor");
            assert_eq!(start % CHUNK, 0);
            // update.cu's blocks cover start .. min(start + CHUNK, n).
            for count in &mut seen[t][start..(start + CHUNK).min(lens[t])] {
                *count += 1;
            }
            let index = k as u32 - first[t];
            assert_eq!(
                index as usize * CHUNK,
                start,
                "tensor {t}'s chunks are contiguous from its first"
            );
        }
        for (t, s) in seen.iter().enumerate() {
            assert!(s.iter().all(|&c| c == 1), "tensor {t} of {} elements", lens[t]);
            let count = lens[t].div_ceil(CHUNK);
            let listed = chunks.iter().filter(|c| c[0] as usize == t).count();
            assert_eq!(listed, count, "tensor {t}: clip's per-tensor chunk count");
        }
        assert_eq!(chunks.len(), lens.iter().map(|n| n.div_ceil(CHUNK)).sum::<usize>());
    }

    #[test]
    fn launches_cover_their_rows_and_never_have_an_empty_grid() {
        for rows in [0, 1, 7, 8, 9, 300] {
            let l = row_blocks(rows);
            assert!(l.grid[0] >= 1);
            assert!(l.grid[0] as usize * ROWS_PER_BLOCK >= rows);
            let (tiles, [_, cols, sum]) = layer_norm_backward(rows, 65);
            assert!(tiles >= 1 && tiles * TILE_ROWS >= rows);
            assert_eq!(cols.grid, [3, tiles as u32, 1]);
            assert_eq!(sum.grid[0] * sum.block[0], 256);
        }
        assert_eq!(grid_stride(0).grid[0], 1);
        assert_eq!(grid_stride(257).grid[0], 2);
        assert_eq!(grid_stride(usize::pow(2, 30)).grid[0], 65_535);
    }
}
