//! The status page in a real headless browser (Debian's `chromium`, driven
//! over the DevTools protocol on a pipe): it shows the held lock (holder and
//! the client name its `HELLO` gave, never the token) and the waiter of a
//! scenario set up here, and follows the lock when it moves to the waiter,
//! with no reload. Screenshots are kept under
//! `target/` (`target/status-page.png`, `target/status-page-moved.png`).
//!
//! Needs `chromium` (scripts/test.sh installs it). Without it this test
//! fails, saying so: it never skips silently. `CLASTOR_CHROMIUM` names
//! another binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clastor::backend::memory::MemoryBackend;
use clastor::server::{self, HttpConfig, ServerConfig};
use clastor::{Engine, EngineConfig};
use serde_json::{Value, json};

/// A headless chromium whose DevTools protocol runs over two FIFOs
/// (`--remote-debugging-pipe`: commands in on fd 3, replies out on fd 4, each
/// message a JSON object ended by a NUL byte).
struct Browser {
    child: Child,
    commands: File,
    replies: mpsc::Receiver<Value>,
    next_id: u64,
    session: String,
    _dir: tempfile::TempDir,
}

impl Browser {
    fn open(url: &str) -> Browser {
        let chromium = std::env::var("CLASTOR_CHROMIUM").unwrap_or_else(|_| "chromium".to_owned());
        let found = Command::new(&chromium)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        assert!(
            found.is_ok_and(|s| s.success()),
            "`{chromium}` is not installed: the status page test needs a headless browser \
             (scripts/test.sh installs Debian's chromium; or set CLASTOR_CHROMIUM)"
        );
        let dir = tempfile::tempdir().unwrap();
        let (cmd_fifo, reply_fifo) = (dir.path().join("cdp-in"), dir.path().join("cdp-out"));
        for fifo in [&cmd_fifo, &reply_fifo] {
            assert!(Command::new("mkfifo").arg(fifo).status().unwrap().success());
        }
        let script = format!(
            "exec \"$0\" --headless --no-sandbox --disable-gpu --no-first-run --hide-scrollbars \
             --window-size=1280,900 --remote-debugging-pipe --user-data-dir={} about:blank 3<{} 4>{}",
            dir.path().join("profile").display(),
            cmd_fifo.display(),
            reply_fifo.display()
        );
        let child = Command::new("bash")
            .args(["-c", &script, &chromium])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Same order as the shell's redirections, or both sides block.
        let commands = OpenOptions::new().write(true).open(&cmd_fifo).unwrap();
        let mut replies_in = File::open(&reply_fifo).unwrap();
        let (tx, replies) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 64 * 1024];
            while let Ok(n @ 1..) = replies_in.read(&mut chunk) {
                buf.extend_from_slice(&chunk[..n]);
                while let Some(end) = buf.iter().position(|&b| b == 0) {
                    let msg: Vec<u8> = buf.drain(..=end).collect();
                    if let Ok(v) = serde_json::from_slice(&msg[..msg.len() - 1])
                        && tx.send(v).is_err()
                    {
                        return;
                    }
                }
            }
        });
        let mut b = Browser {
            child,
            commands,
            replies,
            next_id: 0,
            session: String::new(),
            _dir: dir,
        };
        let target = b.call("Target.createTarget", json!({ "url": url }));
        let target = target["targetId"].as_str().unwrap().to_owned();
        let attached = b.call("Target.attachToTarget", json!({ "targetId": target, "flatten": true }));
        b.session = attached["sessionId"].as_str().unwrap().to_owned();
        b
    }

    /// Sends a command (to the page once attached) and returns its result.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.commands.write_all(&bytes).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let reply = self
                .replies
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no reply to {method}"));
            if reply["id"] == id {
                assert!(reply.get("error").is_none(), "{method}: {reply}");
                return reply["result"].clone();
            }
        }
    }

    /// Evaluates `expression` in the page; its value (JSON).
    fn eval(&mut self, expression: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true }),
        );
        r["result"]["value"].clone()
    }

    /// Polls `expression` until `ok` accepts its value; fails after `within`.
    fn wait_for(&mut self, what: &str, within: Duration, expression: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let v = self.eval(expression);
            if ok(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "the page did not show {what} within {within:?}; it shows {v}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn screenshot(&mut self, to: &Path) {
        let shot = self.call("Page.captureScreenshot", json!({ "format": "png" }));
        let png = base64_decode(shot["data"].as_str().unwrap());
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::write(to, png).unwrap();
        println!("screenshot: {}", to.display());
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=' && !c.is_ascii_whitespace()).collect();
    for chunk in bytes.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &c)| n | u32::from(value(c)) << (18 - 6 * i));
        let take = chunk.len().saturating_sub(1);
        out.extend_from_slice(&n.to_be_bytes()[1..=take]);
    }
    out
}

/// `target/` of this build: where the screenshots are kept.
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().to_path_buf()
}

/// What the page shows of `transaction/tx-page`: its row's cells and its
/// waiters, as JSON text.
const ROW: &str = r#"(() => {
  const row = document.querySelector('#locks tr.lock[data-key="transaction/tx-page"]');
  if (!row) return null;
  return { cells: [...row.cells].map(c => c.innerText), waiters: [...row.querySelectorAll('li.waiter')].map(l => l.innerText),
           refreshes: Number(document.body.dataset.refreshes || 0) };
})()"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_holder_and_waiter_and_follows_the_lock() {
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        http: Some(HttpConfig::new("127.0.0.1:0".parse().unwrap())),
        ..ServerConfig::default()
    };
    let handle = server::spawn(Engine::new(MemoryBackend::new(), EngineConfig::default()), config)
        .await
        .unwrap();
    let http = handle.http_addr().unwrap();

    // The scenario: A holds the lock, B waits for it.
    let named = |name: &'static str| {
        clastor_client::Client::builder(handle.local_addr())
            .client_name(name)
            .connect()
    };
    let a = named("page-worker-a").await.unwrap();
    let b = named("page-worker-b").await.unwrap();
    let held = a
        .lock("transaction", "tx-page")
        .trace_id("page-test")
        .acquire()
        .await
        .unwrap()
        .unwrap();
    let waiting = {
        let b = b.clone();
        tokio::spawn(async move {
            b.lock("transaction", "tx-page")
                .wait(Duration::from_secs(60))
                .acquire()
                .await
        })
    };
    let (a_id, a_token) = (held.connection_id(), held.token());

    let url = format!("http://{http}/");
    let shown = tokio::task::block_in_place(|| {
        let mut browser = Browser::open(&url);
        let shown = browser.wait_for("A holding and B waiting", Duration::from_secs(30), ROW, |v| {
            let cells = v["cells"].to_string();
            cells.contains(&format!("(#{a_id})"))
                && cells.contains("page-worker-a")
                && v["waiters"].as_array().is_some_and(|w| w.len() == 1)
        });
        browser.screenshot(&target_dir().join("status-page.png"));
        (browser, shown)
    });
    let (mut browser, shown) = shown;
    assert!(
        shown["cells"][5].as_str().unwrap().contains("page-test"),
        "the trace id is shown: {shown}"
    );
    assert!(
        shown["waiters"][0].as_str().unwrap().contains("page-worker-b"),
        "the waiter's client name is shown: {shown}"
    );
    // The token is the capability to release HTTP locks: never on the page.
    assert!(!shown.to_string().contains(&a_token.to_string()), "{shown}");
    let refreshes_before = shown["refreshes"].as_u64().unwrap();

    // The lock moves to B; the open page follows without a reload.
    held.release().await.unwrap();
    let granted = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .unwrap();
    let (b_id, b_token) = (granted.connection_id(), granted.token());
    assert!(b_token > a_token);
    let moved = tokio::task::block_in_place(|| {
        let moved = browser.wait_for("B holding, nobody waiting", Duration::from_secs(30), ROW, |v| {
            let cells = v["cells"].to_string();
            cells.contains(&format!("(#{b_id})"))
                && cells.contains("page-worker-b")
                && !cells.contains(&b_token.to_string())
                && v["waiters"].as_array().is_some_and(Vec::is_empty)
        });
        browser.screenshot(&target_dir().join("status-page-moved.png"));
        moved
    });
    assert!(
        moved["refreshes"].as_u64().unwrap() > refreshes_before,
        "updated live: {moved}"
    );
    // The connections table lists both clients, by name.
    let connections = tokio::task::block_in_place(|| {
        browser.eval("[...document.querySelectorAll('#connections tbody tr')].map(r => r.cells[1].innerText)")
    });
    assert_eq!(connections, json!(["page-worker-a", "page-worker-b"]));

    drop(browser);
    drop(granted);
    handle.shutdown().await;
}
