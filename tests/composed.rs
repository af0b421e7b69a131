//! The golden tests again on the composed path: dino_rs's kernels off (`OpsPolicy::composed()`,
//! what `DINO_RS_COMPOSED_OPS=1` asks for), every layer, the loss, AdamW and the EMA composed of
//! candle ops, as on CUDA and in other dtypes. That path must match the official code as well.
//! The policy is switched in-process, for each test's thread and the pool threads it hands work to.

#[path = "golden.rs"]
mod golden;

use _dino_rs::ops::OpsPolicy;

macro_rules! on_the_composed_path {
    ($($name:ident),* $(,)?) => {
        mod composed {
            use super::*;
            $(
                #[test]
                fn $name() {
                    OpsPolicy::composed().with(golden::$name)
                }
            )*
        }
    };
}

on_the_composed_path!(
    backbone_matches_for_global_local_and_rectangular_crops,
    head_and_multicrop_wrapper_match,
    schedules_match_the_official_cosine_scheduler,
    dino_loss_and_centering_match_across_the_temperature_warmup,
    first_step_gradients_match_after_clipping,
    two_full_training_steps_match_student_teacher_and_center,
    official_pth_and_safetensors_backbones_load_with_the_same_keys,
    adamw_matches_torch_with_weight_decay_over_three_steps,
);

/// Every golden test has its composed twin above: a new one left out would go untested on that path.
#[test]
fn every_golden_test_runs_on_the_composed_path() {
    let golden = include_str!("golden.rs");
    let this = include_str!("composed.rs");
    let tests = golden.matches("#[test]").count();
    let listed = golden
        .split("pub fn ")
        .skip(1)
        .filter_map(|rest| rest.split('(').next())
        .filter(|name| this.contains(&format!("    {name},")))
        .count();
    assert!(
        tests >= 8 && listed == tests,
        "{tests} golden tests, {listed} run composed"
    );
}
