//! Cold start: from exec to the first answer to `GET /`, as the host's readiness probe sees it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One start of `exe args` on a free port with `env`; the time until `GET /` answers.
pub fn once(exe: &Path, args: &[&str], env: &[(&'static str, String)]) -> Duration {
    let port = cvchain_testkit::free_port();
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .env_clear()
        .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let started = Instant::now();
    let mut child = cmd.spawn().expect("start");
    let elapsed = loop {
        if answers(port) {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{} never answered GET /",
            exe.display()
        );
        std::thread::sleep(Duration::from_micros(200));
    };
    let _ = child.kill();
    let _ = child.wait();
    elapsed
}

fn answers(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.1 200")
}

/// The median of `runs` starts of each, alternating so drift hits both alike.
pub fn compare(
    runs: usize,
    a: (&Path, &[&str], &[(&'static str, String)]),
    b: (&Path, &[&str], &[(&'static str, String)]),
) -> (Duration, Duration) {
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    // One start of each first, so the page cache holds both binaries.
    once(a.0, a.1, a.2);
    once(b.0, b.1, b.2);
    for _ in 0..runs {
        ta.push(once(a.0, a.1, a.2));
        tb.push(once(b.0, b.1, b.2));
    }
    (median(&mut ta), median(&mut tb))
}

pub fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2
    }
}
