//! Which of dino_rs's own kernels and graph nodes run, in one place. The process default is read
//! once from the environment; a scope on one thread can override it ([`OpsPolicy::with`]), and
//! `parallel::install` carries the caller's policy onto the pool thread that runs its work, so a
//! test can take any path in-process (the golden tests on the composed path: tests/composed.rs).
//!
//! | switch | off when | what runs instead |
//! |---|---|---|
//! | `kernels` | `DINO_RS_COMPOSED_OPS=1` | candle ops everywhere: the fused CPU kernels and most CUDA kernels off |
//! | `fused_cpu` | (parity checks only) | the CPU takes the path of other devices, their kernels kept |
//! | `flash_attention` | `DINO_RS_FLASH_ATTENTION=0` | attention composed on CUDA, the other kernels kept |
//! | `block_node` | `DINO_RS_BLOCK_NODE=0` | transformer blocks layer by layer off the fused CPU path |

use std::cell::Cell;
use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpsPolicy {
    /// dino_rs's fused CPU kernels and its CUDA kernels (off: candle ops, on every device).
    pub kernels: bool,
    /// The fused CPU kernels (off: the CPU composes as other devices do).
    pub fused_cpu: bool,
    /// The flash attention kernels (CUDA, bf16, head dimension 64).
    pub flash_attention: bool,
    /// A transformer block as one graph node off the fused CPU path.
    pub block_node: bool,
}

thread_local! {
    static SCOPED: Cell<Option<OpsPolicy>> = const { Cell::new(None) };
}

impl Default for OpsPolicy {
    /// Everything on.
    fn default() -> Self {
        OpsPolicy {
            kernels: true,
            fused_cpu: true,
            flash_attention: true,
            block_node: true,
        }
    }
}

impl OpsPolicy {
    /// The policy the environment asks for (every switch on unless turned off, as the table says).
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        OpsPolicy {
            kernels: var("DINO_RS_COMPOSED_OPS").is_none_or(|v| v == "0"),
            fused_cpu: true,
            flash_attention: var("DINO_RS_FLASH_ATTENTION").is_none_or(|v| v != "0"),
            block_node: var("DINO_RS_BLOCK_NODE").is_none_or(|v| v != "0"),
        }
    }

    /// dino_rs's kernels off: candle ops everywhere (what `DINO_RS_COMPOSED_OPS=1` asks for).
    pub fn composed() -> Self {
        OpsPolicy {
            kernels: false,
            ..Self::default()
        }
    }

    /// The policy in force on this thread: a scope's, else the process's (read from the
    /// environment the first time it is asked for).
    pub fn current() -> Self {
        static PROCESS: OnceLock<OpsPolicy> = OnceLock::new();
        SCOPED
            .with(Cell::get)
            .unwrap_or_else(|| *PROCESS.get_or_init(Self::from_env))
    }

    /// Runs `f` under this policy on this thread (and, through `parallel::install`, on the pool
    /// threads it hands work to); the previous policy comes back afterwards, even on a panic.
    pub fn with<R>(self, f: impl FnOnce() -> R) -> R {
        struct Restore(Option<OpsPolicy>);
        impl Drop for Restore {
            fn drop(&mut self) {
                SCOPED.with(|s| s.set(self.0));
            }
        }
        let _restore = Restore(SCOPED.with(|s| s.replace(Some(self))));
        f()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_overrides_the_process_policy_and_gives_it_back() {
        let process = OpsPolicy::current();
        let inner = OpsPolicy::composed().with(|| {
            let seen = OpsPolicy::current();
            // Work handed to the pool sees the scope too.
            let on_pool = crate::parallel::install(OpsPolicy::current);
            (seen, on_pool)
        });
        assert_eq!(inner, (OpsPolicy::composed(), OpsPolicy::composed()));
        assert_eq!(OpsPolicy::current(), process);
        let caught = std::panic::catch_unwind(|| OpsPolicy::composed().with(|| panic!("inside")));
        assert!(caught.is_err());
        assert_eq!(OpsPolicy::current(), process);
    }

    #[test]
    fn the_composed_policy_takes_the_fused_cpu_kernels_away() -> candle_core::Result<()> {
        let x = candle_core::Tensor::zeros((2, 3), candle_core::DType::F32, &candle_core::Device::Cpu)?;
        let fused = OpsPolicy::default().with(|| crate::ops::fused(&x));
        let composed = OpsPolicy::composed().with(|| crate::ops::fused(&x));
        assert_eq!((fused, composed), (true, false));
        Ok(())
    }
}
