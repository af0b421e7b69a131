//! The optimiser's updates over every parameter: AdamW and the EMA teacher one tensor at a time on
//! the CPU (update.rs, fused kernels), and all tensors in one launch on CUDA with gradient clipping
//! (foreach.rs, the multi-tensor kernels of src/ops/cuda/update.cu). src/optim.rs and
//! src/teacher.rs call them; elsewhere they decline and candle ops do the work.

pub(super) mod foreach;
pub(super) mod update;
