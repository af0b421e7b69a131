//! Run-time CPU dispatch for the hot loops (augmentation pixels, training kernels).

/// Defines `fn name(args)` twice over one `#[inline(always)]` body: once for baseline x86-64 and
/// once with AVX2 enabled, picked at run time. The wheel stays portable while the per-pixel loops
/// get 256-bit vectors and native 32-bit multiplies where the CPU has them.
macro_rules! avx2_multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        avx2_multiversion! { $(#[$m])* $vis fn $name($($arg: $ty),*) -> () $body }
    };
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn imp($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    imp($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}
