mod common;

#[test]
fn hello() {
    if !kiln_testsupport::require(kiln_testsupport::is_root(), "root") {
        return;
    }
    let code = kiln_executor::userns::run_in_user_namespace(|| 0);
    let _ = code;
    let rootfs = common::busybox();
    let result = common::run(&common::step(
        rootfs.path(),
        "echo hello; id; cat /proc/self/status | grep Cap; ls /proc/self/fd; hostname; cat /etc/hosts; mount | head -30",
    ));
    eprintln!(
        "exit={:?}\nstdout:\n{}\nstderr:\n{}",
        result.exit,
        common::stdout(&result),
        String::from_utf8_lossy(&result.stderr)
    );
    assert_eq!(result.exit.exit_code, 0);
}
