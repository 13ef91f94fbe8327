//! `talkline serve` over TLS: a self-signed certificate made here, WSS and HTTPS clients that
//! trust only it, plain HTTP refused on the TLS port, and clear start-up errors for bad files.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use talkline_tests::{pcm16, start_server, stderr, talkline};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_tungstenite::tungstenite::Message;

/// A fresh self-signed certificate for `localhost` in `dir`: (cert path, key path, cert PEM).
fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf, String) {
    let rcgen::CertifiedKey { cert, key_pair } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("a certificate");
    let cert_path = dir.join(format!("{name}.crt"));
    let key_path = dir.join(format!("{name}.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key_pair.serialize_pem()).unwrap();
    (cert_path, key_path, cert.pem())
}

/// A TLS client that trusts `cert_pem` and nothing else.
fn connector(cert_pem: &str) -> tokio_rustls::TlsConnector {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(cert_pem.as_bytes()) {
        roots.add(cert.expect("our own PEM")).unwrap();
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

fn https_client(cert_pem: &str, addr: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap())
        .resolve("localhost", addr.parse().unwrap())
        .build()
        .unwrap()
}

/// `dir/talkline.toml`: `sections`, then a `[tls]` section naming `cert` and `key`.
fn tls_config(dir: &Path, sections: &str, cert: &Path, key: &Path) -> PathBuf {
    let config = dir.join("talkline.toml");
    std::fs::write(
        &config,
        format!(
            "{sections}[tls]\ncert = {:?}\nkey = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ),
    )
    .unwrap();
    config
}

fn port(addr: &str) -> &str {
    addr.rsplit(':').next().unwrap()
}

#[test]
fn wss_and_https_work_with_a_self_signed_certificate_and_plain_http_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, cert_pem) = self_signed(dir.path(), "server");
    // The greeting gives the agent something to say over WSS without any speech recognition.
    let greeting = "[agent]\ngreeting = \"Hello, this is the clinic.\"\n";
    let config = tls_config(dir.path(), greeting, &cert, &key);
    let mut server = start_server(&["--config", config.to_str().unwrap()]);
    let addr = server.addr.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let https = https_client(&cert_pem, &addr);
        let healthz = format!("https://localhost:{}/healthz", port(&addr));
        let health = https.get(&healthz).send().await.expect("HTTPS works");
        assert_eq!(health.status().as_u16(), 200);
        assert_eq!(health.text().await.unwrap(), "ok\n");

        // A client that does not trust the certificate is refused by its own TLS stack.
        assert!(reqwest::get(&healthz).await.is_err());

        // Plain HTTP on the TLS port gets no HTTP answer, and costs the server nothing.
        let mut plain = tokio::net::TcpStream::connect(&addr).await.unwrap();
        plain
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut answer))
            .await
            .expect("the server ends a plain-HTTP connection");
        assert!(
            !answer.starts_with(b"HTTP/"),
            "plain HTTP was answered: {:?}",
            String::from_utf8_lossy(&answer)
        );

        // WSS: hello, audio frames in, the greeting's audio out.
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let tls = connector(&cert_pem)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("the TLS handshake");
        let url = format!("wss://localhost:{}/ws", port(&addr));
        let (mut ws, _) = tokio_tungstenite::client_async(url, tls)
            .await
            .expect("the WebSocket handshake over TLS");
        ws.send(Message::Text(
            r#"{"type":"hello","sample_rate":16000}"#.into(),
        ))
        .await
        .unwrap();
        let ready = ws.next().await.unwrap().unwrap();
        assert!(ready.to_text().unwrap().contains("ready"), "{ready:?}");
        let (mut tx, mut rx) = ws.split();
        let sender = tokio::spawn(async move {
            let start = Instant::now();
            for i in 0..150u64 {
                tokio::time::sleep_until((start + Duration::from_millis(20 * i)).into()).await;
                if tx
                    .send(Message::Binary(pcm16(&[0.0; 320]).into()))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            tx
        });
        let (mut agent_bytes, mut energy) = (0usize, 0f64);
        let mut greeting = None;
        while greeting.is_none() {
            let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(30), rx.next()).await
            else {
                break;
            };
            match msg {
                Message::Binary(b) => {
                    assert_eq!(b.len(), 640, "20 ms frames of 16 kHz PCM16");
                    for s in b.chunks_exact(2) {
                        let x = i16::from_le_bytes([s[0], s[1]]) as f64 / 32768.0;
                        energy += x * x;
                    }
                    agent_bytes += b.len();
                }
                Message::Text(t) => {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    if v["type"] == "turn" {
                        greeting = v["agent_text"].as_str().map(str::to_owned);
                    }
                }
                _ => {}
            }
        }
        let mut tx = sender.await.unwrap();
        let _ = tx.send(Message::Text(r#"{"type":"bye"}"#.into())).await;
        assert_eq!(greeting.as_deref(), Some("Hello, this is the clinic."));
        let samples = agent_bytes / 2;
        assert!(
            samples > 16_000 / 2,
            "{samples} samples of greeting over WSS"
        );
        assert!(
            (energy / samples as f64).sqrt() > 0.01,
            "the greeting is silent"
        );

        // Still serving after all of that.
        let health = https.get(&healthz).send().await.expect("HTTPS still works");
        assert_eq!(health.status().as_u16(), 200);
    });
    // Ctrl-C still shuts the server down cleanly.
    let status = server
        .interrupt(Duration::from_secs(30))
        .expect("the server exits after SIGINT");
    assert!(status.success(), "{status:?}");
}

#[test]
fn missing_unreadable_or_mismatched_tls_files_fail_at_start_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = self_signed(dir.path(), "a");
    let (_, other_key, _) = self_signed(dir.path(), "b");
    let missing = dir.path().join("missing.pem");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a PEM file\n").unwrap();
    let serve = |cert: &Path, key: Option<&Path>| {
        let mut args = vec![
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert.to_str().unwrap(),
        ];
        if let Some(key) = key {
            args.extend(["--tls-key", key.to_str().unwrap()]);
        }
        let out = talkline(&args, &[]);
        assert!(!out.status.success(), "served with {cert:?} and {key:?}");
        stderr(&out)
    };
    let cases: [(&Path, &Path, &Path, &str); 5] = [
        (&missing, &key, &missing, "cannot read the TLS certificate"),
        (&cert, &missing, &missing, "cannot read the TLS key"),
        (&garbage, &key, &garbage, "no `BEGIN CERTIFICATE` block"),
        (&cert, &garbage, &garbage, "no usable private key"),
        (&cert, &other_key, &other_key, "cannot be used together"),
    ];
    for (cert, key, named, reason) in cases {
        let err = serve(cert, Some(key));
        assert!(
            err.contains(&named.display().to_string()) && err.contains(reason),
            "{cert:?} + {key:?}: {err}"
        );
    }
    // `talkline config check` reports the same problem.
    let config = tls_config(dir.path(), "", &cert, &other_key);
    let out = talkline(
        &["config", "check", "--config", config.to_str().unwrap()],
        &[],
    );
    assert!(!out.status.success());
    let report = talkline_tests::stdout(&out);
    assert!(
        report.contains("PROBLEM  TLS") && report.contains("cannot be used together"),
        "{report}"
    );
    // Half a configuration is an error too.
    let err = serve(&cert, None);
    assert!(err.contains("--tls-key"), "{err}");
}
