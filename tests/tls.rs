//! TLS of both listeners, on real loopback sockets with certificates made
//! here (`rcgen`): a client trusting the daemon's CA connects (gRPC and
//! HTTP), plaintext and an unknown CA are refused, mutual TLS refuses a
//! client without a certificate (or with one of another CA), a certificate
//! swapped on disk is served after SIGHUP (real binary), and the command
//! line connects with `https://` and `--tls-ca`. Also the `/metrics` token
//! and `--metrics-metadata=false`.

mod server_support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use vcid::proto::vci_monitor_client::VciMonitorClient;
use vcid::proto::{CreateRunRequest, ListRunsRequest};
use vcid::server::{ServeConfig, TlsFiles};

use server_support::{http_get, start, Daemon};

/// A CA and the PEM of its certificate.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf certificate for `names` (DNS names or IP addresses): (cert
    /// PEM, key PEM).
    fn leaf(&self, names: &[&str]) -> (String, String) {
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &*self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Server certificate files signed by `ca` for 127.0.0.1 and localhost.
fn server_files(dir: &Path, ca: &Ca, client_ca: Option<&Ca>) -> TlsFiles {
    let (cert, key) = ca.leaf(&["127.0.0.1", "localhost"]);
    TlsFiles {
        cert: write(dir, "server.pem", &cert),
        key: write(dir, "server.key", &key),
        client_ca: client_ca.map(|ca| write(dir, "client-ca.pem", &ca.pem())),
    }
}

/// A gRPC channel over TLS trusting `ca`, optionally with a client
/// identity; `Err` when the handshake (or connection) fails.
async fn channel(
    addr: SocketAddr,
    ca: &Ca,
    identity: Option<(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
}

/// `ListRuns` over a fresh TLS channel: whether it succeeded.
async fn lists(addr: SocketAddr, ca: &Ca, identity: Option<(String, String)>) -> bool {
    match channel(addr, ca, identity).await {
        Ok(channel) => VciMonitorClient::new(channel)
            .list_runs(ListRunsRequest {})
            .await
            .is_ok(),
        Err(_) => false,
    }
}

/// `GET path` over TLS (HTTP/1.1, connection closed after the answer):
/// (status, body), or the handshake error.
async fn https_get(
    addr: SocketAddr,
    ca: &Ca,
    path: &str,
    headers: &str,
) -> Result<(u16, String), std::io::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.issuer.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await?;
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    // rustls reports the peer closing without close_notify as an error
    // after the data; what was read is what counts.
    let _ = tls.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_trusted_clients_and_refuses_plaintext_and_unknown_cas() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, stranger) = (Ca::new("vcid test CA"), Ca::new("someone else"));
    let server = start(ServeConfig {
        tls: Some(server_files(dir.path(), &ca, None)),
        ..ServeConfig::ephemeral(dir.path().join("data"))
    })
    .await;
    let (grpc, http) = (server.grpc_addr(), server.http_addr());
    assert_eq!(server.grpc_url(), format!("https://{grpc}"));
    assert_eq!(server.metrics_url(), format!("https://{http}/metrics"));

    // Trusted: gRPC and HTTP both work.
    let mut client = VciMonitorClient::new(channel(grpc, &ca, None).await.unwrap());
    client
        .create_run(CreateRunRequest {
            run_id: "secure".into(),
            num_classes: 3,
            feature_dim: 4,
            ..Default::default()
        })
        .await
        .unwrap();
    let (status, body) = https_get(http, &ca, "/metrics", "").await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("vcid_run_info{run=\"secure\"}"), "{body}");

    // Unknown CA: refused by the client's verification, on both listeners.
    assert!(!lists(grpc, &stranger, None).await);
    assert!(https_get(http, &stranger, "/healthz", "").await.is_err());

    // Plaintext gRPC: no answer.
    let plain = Endpoint::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2));
    let refused = match plain.connect().await {
        Err(_) => true,
        Ok(channel) => VciMonitorClient::new(channel)
            .list_runs(ListRunsRequest {})
            .await
            .is_err(),
    };
    assert!(refused, "a plaintext gRPC call was answered");
    // Plaintext HTTP: the connection closes without an HTTP answer.
    let plain_http = tokio::task::spawn_blocking(move || {
        std::panic::catch_unwind(|| http_get(http, "/healthz")).ok()
    })
    .await
    .unwrap();
    assert!(
        plain_http.is_none(),
        "plaintext HTTP answered: {plain_http:?}"
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_requires_a_client_certificate_of_the_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, clients, stranger) = (Ca::new("server CA"), Ca::new("client CA"), Ca::new("other"));
    let server = start(ServeConfig {
        tls: Some(server_files(dir.path(), &ca, Some(&clients))),
        ..ServeConfig::ephemeral(dir.path().join("data"))
    })
    .await;
    let grpc = server.grpc_addr();
    assert!(!lists(grpc, &ca, None).await, "no client certificate");
    assert!(
        !lists(grpc, &ca, Some(stranger.leaf(&["trainer"]))).await,
        "a client certificate of another CA"
    );
    assert!(lists(grpc, &ca, Some(clients.leaf(&["trainer"]))).await);
    // The HTTP listener requires it too.
    assert!(https_get(server.http_addr(), &ca, "/healthz", "")
        .await
        .map_or(true, |(status, _)| status != 200));
    server.stop().await.unwrap();
}

/// The certificate is replaced on disk by one of a new CA; after SIGHUP a
/// client trusting only the new CA connects, one trusting only the old CA
/// no longer can, and the command line connects with `--tls-ca`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_certificate_is_served_after_sighup_and_the_cli_uses_it() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (Ca::new("old CA"), Ca::new("new CA"));
    let files = server_files(dir.path(), &old, None);
    let (cert, key) = (files.cert.to_str().unwrap(), files.key.to_str().unwrap());
    let daemon = Daemon::spawn(
        &dir.path().join("data"),
        &["--tls-cert", cert, "--tls-key", key],
    );
    assert!(lists(daemon.grpc, &old, None).await);
    assert!(!lists(daemon.grpc, &new, None).await);

    let (cert_pem, key_pem) = new.leaf(&["127.0.0.1", "localhost"]);
    std::fs::write(&files.key, key_pem).unwrap();
    std::fs::write(&files.cert, cert_pem).unwrap();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(
        unsafe { libc::kill(daemon.child.id() as libc::pid_t, libc::SIGHUP) },
        0
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !lists(daemon.grpc, &new, None).await {
        assert!(
            std::time::Instant::now() < deadline,
            "the new certificate was not served after SIGHUP"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!lists(daemon.grpc, &old, None).await);
    assert!(daemon
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|line| line.contains("TLS certificate reloaded")));

    // The command line: https:// with --tls-ca; without it the test CA is
    // not trusted.
    let ca_file = write(dir.path(), "new-ca.pem", &new.pem());
    let addr = format!("https://localhost:{}", daemon.grpc.port());
    let vcid = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vcid"));
        cmd.args(["runs", "--format", "json", "--addr", &addr])
            .args(extra);
        for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("VCID_")) {
            cmd.env_remove(name);
        }
        cmd.output().unwrap()
    };
    let out = vcid(&["--tls-ca", ca_file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["runs"], serde_json::json!([]));
    let out = vcid(&[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot reach the vcid server at https://"),
        "{stderr}"
    );
}

/// `--metrics-token-file`: /metrics answers 401 without the token (and
/// with the gRPC one), 200 with it; `--metrics-metadata=false` keeps run
/// metadata out of the labels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_token_and_metadata_switch() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(ServeConfig {
        metrics_token: Some("scrape-only".into()),
        metrics_metadata: false,
        ..ServeConfig::ephemeral(dir.path())
    })
    .await;
    let mut client = server_support::connect(&server.grpc_url()).await;
    client
        .create_run(CreateRunRequest {
            run_id: "private".into(),
            num_classes: 3,
            feature_dim: 4,
            metadata: [("owner".to_string(), "alice@example.com".to_string())].into(),
        })
        .await
        .unwrap();
    let http = server.http_addr();
    let get = move |auth: Option<&'static str>| {
        tokio::task::spawn_blocking(move || {
            let headers: Vec<(&str, &str)> =
                auth.map(|a| ("authorization", a)).into_iter().collect();
            let reply = server_support::http_request(http, "/metrics", &headers);
            (reply.0, reply.1)
        })
    };
    let (status, body) = get(None).await.unwrap();
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("--metrics-token-file"), "{body}");
    assert_eq!(get(Some("Bearer wrong")).await.unwrap().0, 401);
    let (status, body) = get(Some("Bearer scrape-only")).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("vcid_run_info{run=\"private\"} 1"), "{body}");
    assert!(!body.contains("alice"), "{body}");
    server.stop().await.unwrap();
}
