//! The golden tests again with `DINO_RS_COMPOSED_OPS=1`: the fused CPU kernels off, every layer,
//! the loss, AdamW and the EMA composed of candle ops, as on CUDA and in other dtypes. That path
//! must match the official code as well. The golden tests are compiled into this binary too, and
//! the test below reruns this binary with the variable set and only them selected.

#[path = "golden.rs"]
mod golden;

#[test]
fn golden_tests_pass_on_the_composed_path() {
    if std::env::var_os("DINO_RS_COMPOSED_OPS").is_some() {
        return; // the rerun itself
    }
    let out = std::process::Command::new(std::env::current_exe().expect("test binary path"))
        .env("DINO_RS_COMPOSED_OPS", "1")
        .args(["golden::", "--test-threads=2"])
        .output()
        .expect("rerun the test binary");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "golden tests on the composed path failed:\n{text}"
    );
    let ran = text
        .lines()
        .find_map(|l| l.strip_prefix("test result: ok. "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse::<usize>().ok());
    assert!(
        ran.is_some_and(|n| n >= 7),
        "expected the 7 golden tests to run:\n{text}"
    );
}
