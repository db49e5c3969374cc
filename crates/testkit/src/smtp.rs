//! A real SMTP server on loopback that keeps every message it accepts, and can go down (its
//! port refuses connections, open sessions are cut) and come back on the same port: what a test
//! needs to prove that mail survives an outage and is sent once.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// An SMTP server that accepts every message.
pub struct SmtpSink {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<String>>>,
    serving: Option<JoinHandle<()>>,
}

impl SmtpSink {
    /// Starts on a free loopback port.
    pub async fn start() -> Self {
        let listener = crate::loopback_listener().await;
        let addr = listener.local_addr().expect("a bound address");
        let received = Arc::new(Mutex::new(Vec::new()));
        let serving = Some(tokio::spawn(serve(listener, received.clone())));
        Self {
            addr,
            received,
            serving,
        }
    }

    /// `smtp://127.0.0.1:PORT`, plaintext, for `KEEL_SMTP_URL`.
    pub fn url(&self) -> String {
        format!("smtp://{}", self.addr)
    }

    /// Every message accepted so far, as sent (headers and body).
    pub fn received(&self) -> Vec<String> {
        self.received.lock().expect("sink lock").clone()
    }

    /// Goes down: the port refuses connections and open sessions end.
    pub fn stop(&mut self) {
        if let Some(serving) = self.serving.take() {
            serving.abort();
        }
    }

    /// Comes back on the same port.
    pub async fn restart(&mut self) {
        self.stop();
        let listener = crate::poll::eventually(
            std::time::Duration::from_secs(10),
            "the SMTP port to be free again",
            || async { TcpListener::bind(self.addr).await.ok() },
        )
        .await;
        self.serving = Some(tokio::spawn(serve(listener, self.received.clone())));
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Accepts sessions until aborted; aborting drops the listener and every session with it.
async fn serve(listener: TcpListener, received: Arc<Mutex<Vec<String>>>) {
    let mut sessions = tokio::task::JoinSet::new();
    while let Ok((stream, _)) = listener.accept().await {
        sessions.spawn(session(stream, received.clone()));
    }
}

/// One SMTP session: greets, says yes to everything, keeps each message's DATA.
async fn session(stream: TcpStream, received: Arc<Mutex<Vec<String>>>) {
    let (reader, mut writer) = stream.into_split();
    let mut lines = BufReader::new(reader).lines();
    if writer.write_all(b"220 sink ESMTP\r\n").await.is_err() {
        return;
    }
    while let Ok(Some(line)) = lines.next_line().await {
        let verb = line
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" | "HELO" => b"250-sink\r\n250 8BITMIME\r\n",
            "DATA" => {
                if writer.write_all(b"354 go ahead\r\n").await.is_err() {
                    return;
                }
                let mut message = String::new();
                while let Ok(Some(line)) = lines.next_line().await {
                    if line == "." {
                        break;
                    }
                    message.push_str(line.strip_prefix('.').unwrap_or(&line));
                    message.push('\n');
                }
                received.lock().expect("sink lock").push(message);
                b"250 accepted\r\n"
            }
            "QUIT" => {
                let _ = writer.write_all(b"221 bye\r\n").await;
                return;
            }
            _ => b"250 ok\r\n",
        };
        if writer.write_all(reply).await.is_err() {
            return;
        }
    }
}
