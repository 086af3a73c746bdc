//! Issue 16 point 16: standard gRPC clients other than Go's send the socket path as
//! `:authority` on a Unix socket. A real grpcio client (PyPI: grpcio, grpcio-tools; .ci/run
//! installs them) calls every service; it fails here, loudly, when grpcio is missing.

mod support;

use support::*;

#[tokio::test]
async fn grpcio_calls_every_service_over_the_unix_socket() {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .output()
        .expect("python3 is needed for the grpcio client test");
    assert!(
        probe.status.success(),
        "grpcio is not installed: run `python3 -m pip install grpcio grpcio-tools` (.ci/run does): {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let d = Driver::start().await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/clients/grpcio_client.py"
    );
    let proto = concat!(env!("CARGO_MANIFEST_DIR"), "/proto");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .arg(&d.socket)
        .arg(proto)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "grpcio client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("[default-authority]"), "{stdout}");
    assert!(stdout.contains("[path-authority]"), "{stdout}");
    assert!(stdout.contains("[localhost-authority]"), "{stdout}");
}
