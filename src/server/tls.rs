//! TLS of both listeners (rustls with the ring provider; no OpenSSL):
//! reading the PEM files of `--tls-cert`, `--tls-key` and
//! `--tls-client-ca`, building one rustls configuration per listener (ALPN
//! `h2` for gRPC, `http/1.1` for HTTP), and swapping them when the files
//! change (polled every [`POLL`]) or on SIGHUP, without a restart: new
//! connections get the new certificate, open ones keep theirs.
//!
//! Owns certificate material and its reload; accepting connections and
//! handshakes are `listen`'s. A reload that fails (a half-written file, a
//! key that does not match its certificate) is logged and the previous
//! configuration stays in use.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::error::ServerError;

/// How often the files are compared with what was loaded.
const POLL: Duration = Duration::from_secs(5);

/// Where the certificate material is (PEM files).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key of the leaf certificate (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by one of these
    /// CAs (mutual TLS) on both listeners.
    pub client_ca: Option<PathBuf>,
}

/// The bytes of the three files, as last read.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Material {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

fn invalid(path: &Path, flag: &str, what: impl std::fmt::Display) -> ServerError {
    ServerError::Io {
        what: format!("{flag} {}", path.display()),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string()),
    }
}

impl Material {
    fn read(files: &TlsFiles) -> Result<Material, ServerError> {
        let read = |path: &Path, flag: &str| {
            std::fs::read(path).map_err(|source| ServerError::Io {
                what: format!("reading {flag} {}", path.display()),
                source,
            })
        };
        Ok(Material {
            cert: read(&files.cert, "--tls-cert")?,
            key: read(&files.key, "--tls-key")?,
            client_ca: match &files.client_ca {
                Some(path) => Some(read(path, "--tls-client-ca")?),
                None => None,
            },
        })
    }

    fn certificates(
        bytes: &[u8],
        path: &Path,
        flag: &str,
    ) -> Result<Vec<CertificateDer<'static>>, ServerError> {
        let certs = CertificateDer::pem_slice_iter(bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(path, flag, format!("expected PEM certificates: {e}")))?;
        if certs.is_empty() {
            return Err(invalid(
                path,
                flag,
                "expected at least one PEM \"CERTIFICATE\" block, found none",
            ));
        }
        Ok(certs)
    }

    /// The rustls configuration of one listener.
    fn config(&self, files: &TlsFiles, alpn: &[u8]) -> Result<ServerConfig, ServerError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = Material::certificates(&self.cert, &files.cert, "--tls-cert")?;
        let key = PrivateKeyDer::from_pem_slice(&self.key).map_err(|e| {
            invalid(
                &files.key,
                "--tls-key",
                format!("expected a PEM private key: {e}"),
            )
        })?;
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(&files.cert, "--tls-cert", e))?;
        let builder = match (&self.client_ca, &files.client_ca) {
            (Some(bytes), Some(path)) => {
                let mut roots = RootCertStore::empty();
                for cert in Material::certificates(bytes, path, "--tls-client-ca")? {
                    roots
                        .add(cert)
                        .map_err(|e| invalid(path, "--tls-client-ca", e))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| invalid(path, "--tls-client-ca", e))?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(certs, key).map_err(|e| {
            invalid(
                &files.key,
                "--tls-key",
                format!("expected the key of the --tls-cert certificate: {e}"),
            )
        })?;
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(config)
    }
}

/// The current TLS configuration of one listener.
#[derive(Debug)]
pub(crate) struct Acceptor {
    current: RwLock<Arc<ServerConfig>>,
}

impl Acceptor {
    fn new(config: ServerConfig) -> Arc<Acceptor> {
        Arc::new(Acceptor {
            current: RwLock::new(Arc::new(config)),
        })
    }

    /// An acceptor with the configuration in force now.
    pub(crate) fn current(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(
            &self.current.read().unwrap_or_else(PoisonError::into_inner),
        ))
    }

    fn set(&self, config: ServerConfig) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(config);
    }
}

/// Both listeners' TLS and the files they come from.
#[derive(Debug)]
pub(crate) struct Tls {
    files: TlsFiles,
    pub(crate) grpc: Arc<Acceptor>,
    pub(crate) http: Arc<Acceptor>,
    /// What the last load or reload attempt read (a failed attempt is not
    /// retried until the files change again).
    seen: Mutex<Material>,
}

const ALPN_GRPC: &[u8] = b"h2";
const ALPN_HTTP: &[u8] = b"http/1.1";

impl Tls {
    /// Reads and checks the files (blocking; start-up only).
    pub(crate) fn load(files: TlsFiles) -> Result<Tls, ServerError> {
        let material = Material::read(&files)?;
        let grpc = Acceptor::new(material.config(&files, ALPN_GRPC)?);
        let http = Acceptor::new(material.config(&files, ALPN_HTTP)?);
        Ok(Tls {
            files,
            grpc,
            http,
            seen: Mutex::new(material),
        })
    }

    /// Re-reads the files; when they changed since the last attempt
    /// (or `force`), builds and installs the new configurations. Blocking.
    fn reload(&self, force: bool) -> Result<bool, ServerError> {
        let material = Material::read(&self.files)?;
        {
            let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            if !force && *seen == material {
                return Ok(false);
            }
            *seen = material.clone();
        }
        let grpc = material.config(&self.files, ALPN_GRPC)?;
        let http = material.config(&self.files, ALPN_HTTP)?;
        self.grpc.set(grpc);
        self.http.set(http);
        Ok(true)
    }

    /// Reloads on SIGHUP and when the files change, until shutdown.
    pub(crate) async fn watch(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        #[cfg(unix)]
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(signal) => Some(signal),
            Err(err) => {
                tracing::warn!(%err, "no SIGHUP handler; TLS files are still polled");
                None
            }
        };
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            #[cfg(unix)]
            let hup = async {
                match hangup.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let hup = std::future::pending::<Option<()>>();
            let force = tokio::select! {
                _ = super::shutting_down(&mut shutdown) => return,
                _ = poll.tick() => false,
                _ = hup => true,
            };
            let tls = Arc::clone(&self);
            match tokio::task::spawn_blocking(move || tls.reload(force)).await {
                Ok(Ok(true)) => tracing::info!(
                    cert = %self.files.cert.display(),
                    "TLS certificate reloaded; new connections use it"
                ),
                Ok(Ok(false)) => {}
                Ok(Err(err)) => {
                    tracing::error!(%err, "TLS reload failed; the previous certificate stays in use")
                }
                Err(err) => tracing::error!(%err, "TLS reload task failed"),
            }
        }
    }
}
