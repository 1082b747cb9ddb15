//! Where and how the sink connects: `DATABASE_URL` with libpq's TLS parameters.
//!
//! tokio-postgres knows `sslmode=disable|prefer|require` but neither `verify-ca`,
//! `verify-full` nor `sslrootcert`, so those two parameters are taken out of the URL
//! here and turned into a rustls client configuration with libpq's semantics:
//!
//! | `sslmode` | TLS | certificate checked |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` (default) | when the server offers it | no |
//! | `require` | always | no; against `sslrootcert` when one is given (as libpq) |
//! | `verify-ca` | always | chain to `sslrootcert` |
//! | `verify-full` | always | chain to `sslrootcert`, and the host name |
//!
//! `sslrootcert` is a PEM file, or `system` for the platform's roots (which, as in
//! libpq, implies and requires `verify-full`). `verify-*` without it reads
//! `~/.postgresql/root.crt`, as libpq does.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = String;
    fn from_str(value: &str) -> Result<SslMode, String> {
        match value {
            "disable" => Ok(SslMode::Disable),
            "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-ca" => Ok(SslMode::VerifyCa),
            "verify-full" => Ok(SslMode::VerifyFull),
            _ => Err("sslmode accepts disable, prefer, require, verify-ca or verify-full".into()),
        }
    }
}

/// A parsed `DATABASE_URL`: the connection settings and the TLS connector they need.
#[derive(Clone)]
pub struct Database {
    /// Host, user, database, timeouts… (the TLS mode tokio-postgres should negotiate included).
    pub config: tokio_postgres::Config,
    /// The mode asked for.
    pub ssl_mode: SslMode,
    /// The connector every connection, cancel request and probe uses.
    pub tls: MakeRustlsConnect,
}

impl fmt::Debug for Database {
    // tokio_postgres::Config's Debug already redacts the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Database").field("config", &self.config).field("ssl_mode", &self.ssl_mode).finish()
    }
}

impl FromStr for Database {
    type Err = String;

    /// Parses `postgres://user:pass@host:port/db?params`, or libpq's key=value form (`host=a,b
    /// port=5432,5432 dbname=app target_session_attrs=read-write sslmode=verify-full ...`); errors
    /// never repeat the URL (it may hold a password).
    fn from_str(url: &str) -> Result<Database, String> {
        let is_uri = url.starts_with("postgres://") || url.starts_with("postgresql://");
        let (mut config, ssl_mode, root_cert) = if is_uri { parse_uri(url)? } else { parse_key_value(url)? };
        let roots = match root_cert.as_deref() {
            Some("system") => match ssl_mode.unwrap_or(SslMode::VerifyFull) {
                SslMode::VerifyFull => Roots::System,
                weak => return Err(format!("sslrootcert=system needs sslmode=verify-full (got {weak:?})")),
            },
            Some(file) => Roots::File(PathBuf::from(file)),
            None => Roots::Default,
        };
        let ssl_mode = ssl_mode.unwrap_or(if roots == Roots::System { SslMode::VerifyFull } else { SslMode::Prefer });
        if config.get_application_name().is_none() {
            config.application_name("loginflow");
        }
        config.ssl_mode(match ssl_mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => tokio_postgres::config::SslMode::Require,
        });
        let tls = MakeRustlsConnect::new(client_config(ssl_mode, &roots)?);
        Ok(Database { config, ssl_mode, tls })
    }
}

const SHAPE: &str = "expected postgres://user:pass@host:port/db[?sslmode=...&sslrootcert=...] or key=value pairs";

/// What a connection string says: tokio-postgres' settings, and the TLS parameters it does not know.
type Parsed = (tokio_postgres::Config, Option<SslMode>, Option<String>);

/// `postgres://user:pass@host:port,host:port/db?params`.
fn parse_uri(url: &str) -> Result<Parsed, String> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut ssl_mode = None;
    let mut root_cert = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decoded = || percent_encoding::percent_decode_str(value).decode_utf8_lossy().into_owned();
        match key {
            "sslmode" => ssl_mode = Some(decoded().parse::<SslMode>()?),
            "sslrootcert" => root_cert = Some(decoded()),
            _ => rest.push(pair),
        }
    }
    let url = if rest.is_empty() { base.to_owned() } else { format!("{base}?{}", rest.join("&")) };
    let config = url.parse().map_err(|_| {
        // Name the parameter at fault (never its value: it may be a password).
        let base_ok = base.parse::<tokio_postgres::Config>().is_ok();
        match rest.iter().find(|pair| !base_ok || format!("{base}?{pair}").parse::<tokio_postgres::Config>().is_err()) {
            Some(pair) if base_ok => {
                let key = pair.split_once('=').map_or(*pair, |(key, _)| key);
                format!("parameter `{key}` is unknown or has an invalid value")
            }
            _ => SHAPE.to_owned(),
        }
    })?;
    Ok((config, ssl_mode, root_cert))
}

/// libpq's key=value form: `host=a,b port=5432,5432 dbname=app password='it\'s' ...` (values
/// bare, or single-quoted with `\'` and `\\` escapes).
fn parse_key_value(conninfo: &str) -> Result<Parsed, String> {
    let mut ssl_mode = None;
    let mut root_cert = None;
    let mut rest = String::new();
    let mut chars = conninfo.trim().chars().peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect::<String>().trim().to_owned();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(SHAPE.into());
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next().ok_or(SHAPE)? {
                    '\'' => break,
                    '\\' => value.push(chars.next().ok_or(SHAPE)?),
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                value.push(c);
            }
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        match key.as_str() {
            "sslmode" => ssl_mode = Some(value.parse::<SslMode>()?),
            "sslrootcert" => root_cert = Some(value),
            _ => {
                let quoted = value.replace('\\', "\\\\").replace('\'', "\\'");
                rest.push_str(&format!("{key}='{quoted}' "));
            }
        }
    }
    let config = rest.parse().map_err(|_| "a key=value parameter is unknown or has an invalid value".to_owned())?;
    Ok((config, ssl_mode, root_cert))
}

/// Where trusted roots come from.
#[derive(Debug, PartialEq, Eq)]
enum Roots {
    /// None named: libpq's `~/.postgresql/root.crt`, needed only by `verify-*`.
    Default,
    File(PathBuf),
    System,
}

/// The rustls configuration for `mode`.
fn client_config(mode: SslMode, roots: &Roots) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verify_chain = match mode {
        SslMode::Disable | SslMode::Prefer => false,
        SslMode::Require => *roots != Roots::Default,
        SslMode::VerifyCa | SslMode::VerifyFull => true,
    };
    let verifier: Arc<dyn ServerCertVerifier> = if verify_chain {
        let store = Arc::new(root_store(roots)?);
        let webpki = WebPkiServerVerifier::builder_with_provider(store, provider.clone())
            .build()
            .map_err(|err| format!("sslrootcert: {err}"))?;
        if mode == SslMode::VerifyFull {
            webpki
        } else {
            Arc::new(IgnoreHostName(webpki))
        }
    } else {
        Arc::new(AnyCertificate(provider.signature_verification_algorithms))
    };
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| format!("TLS set-up: {err}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

fn root_store(roots: &Roots) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                return Err("sslrootcert=system: no usable certificates in the platform's trust store".into());
            }
        }
        Roots::File(path) => add_pem_file(&mut store, path)?,
        Roots::Default => {
            let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
            let path = home.join(".postgresql/root.crt");
            if !path.exists() {
                return Err(format!(
                    "certificate verification needs sslrootcert=<CA file> or sslrootcert=system ({} does not exist)",
                    path.display()
                ));
            }
            add_pem_file(&mut store, &path)?;
        }
    }
    Ok(store)
}

fn add_pem_file(store: &mut RootCertStore, path: &Path) -> Result<(), String> {
    let unreadable = |err: &dyn fmt::Display| format!("sslrootcert {}: {err}", path.display());
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|err| unreadable(&err))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| unreadable(&err))?;
    let (added, _ignored) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err(unreadable(&"no PEM certificate in the file"));
    }
    Ok(())
}

/// `verify-ca`: the chain must lead to a trusted root; the name on the certificate is not checked.
#[derive(Debug)]
struct IgnoreHostName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for IgnoreHostName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer` / `require` without a root: encrypted, but any certificate is accepted (libpq's
/// semantics; the handshake signature is still checked against the presented key).
#[derive(Debug)]
struct AnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// [`connect_failure`]'s answer when the server's certificate was not trusted.
pub const CERTIFICATE_FAILED: &str = "certificate verification failed";
/// [`connect_failure`]'s answer when the server refused the credentials.
pub const AUTHENTICATION_FAILED: &str = "authentication failed";

/// Which step of connecting failed, for error messages: TCP, the TLS handshake, the
/// server's certificate, or authentication. `None` when the error is not a connection failure.
pub fn connect_failure(err: &tokio_postgres::Error) -> Option<&'static str> {
    if let Some(db) = err.as_db_error() {
        // Class 28: invalid authorization specification (bad password, no pg_hba.conf entry).
        return db.code().code().starts_with("28").then_some(AUTHENTICATION_FAILED);
    }
    let text = err.to_string();
    if text.starts_with("error performing TLS handshake") {
        let certificate = crate::errors::error_chain(err).contains("certificate");
        return Some(if certificate { CERTIFICATE_FAILED } else { "TLS handshake failed" });
    }
    // tokio-postgres words a session refused by `target_session_attrs=read-write` (every host
    // read-only, as during a failover) like a TCP failure.
    if crate::errors::error_chain(err).contains("database does not allow writes") {
        return Some("no host takes writes (target_session_attrs=read-write)");
    }
    if text.starts_with("error connecting to server") || text.starts_with("timeout waiting for server") {
        return Some("TCP connection failed");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<Database, String> {
        url.parse()
    }

    #[test]
    fn the_key_value_form_with_several_hosts_parses_like_the_uri() {
        let db = parse(
            "host=db-a.example,db-b.example port=5432,5433 dbname=app user=loginflow password='it''s \\'q\\''
             target_session_attrs=read-write sslmode=require connect_timeout=5",
        );
        // `''` is not libpq's escape: refused, never echoed.
        assert!(db.is_err_and(|err| !err.contains("it")));
        let db = parse(
            "host=db-a.example,db-b.example port=5432,5433 dbname=app user=loginflow password='s3 \\'cret'
             target_session_attrs=read-write sslmode=require connect_timeout=5",
        )
        .unwrap();
        let hosts: Vec<String> = db.config.get_hosts().iter().map(|h| format!("{h:?}")).collect();
        assert_eq!(hosts.len(), 2, "{hosts:?}");
        assert_eq!(db.config.get_ports(), [5432, 5433]);
        assert_eq!(db.config.get_dbname(), Some("app"));
        assert_eq!(db.config.get_password(), Some(&b"s3 'cret"[..]));
        assert_eq!(db.config.get_target_session_attrs(), tokio_postgres::config::TargetSessionAttrs::ReadWrite);
        assert_eq!(db.ssl_mode, SslMode::Require);
        let uri = parse("postgres://loginflow@db-a.example:5432,db-b.example:5433/app?target_session_attrs=read-write")
            .unwrap();
        assert_eq!(uri.config.get_ports(), [5432, 5433]);
        assert_eq!(uri.config.get_target_session_attrs(), tokio_postgres::config::TargetSessionAttrs::ReadWrite);
        assert!(parse("not a connection string").is_err());
    }

    #[test]
    fn default_is_prefer_like_libpq() {
        let db = parse("postgres://u:secret@db.example:5433/app").unwrap();
        assert_eq!(db.ssl_mode, SslMode::Prefer);
        assert_eq!(db.config.get_ssl_mode(), tokio_postgres::config::SslMode::Prefer);
        assert_eq!(db.config.get_application_name(), Some("loginflow"));
        assert!(!format!("{db:?}").contains("secret"));
    }

    #[test]
    fn modes_map_to_what_tokio_postgres_negotiates() {
        for (mode, expected) in [
            ("disable", tokio_postgres::config::SslMode::Disable),
            ("prefer", tokio_postgres::config::SslMode::Prefer),
            ("require", tokio_postgres::config::SslMode::Require),
        ] {
            let db = parse(&format!("postgres://u@h/d?sslmode={mode}&connect_timeout=3")).unwrap();
            assert_eq!(db.config.get_ssl_mode(), expected, "{mode}");
            assert_eq!(db.config.get_connect_timeout(), Some(&std::time::Duration::from_secs(3)));
        }
    }

    #[test]
    fn verify_modes_need_a_readable_root_certificate() {
        let err = parse("postgres://u@h/d?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem").unwrap_err();
        assert!(err.contains("sslrootcert") && err.contains("/nonexistent/ca.pem"), "{err}");
        let err = parse("postgres://u@h/d?sslmode=verify-ca&sslrootcert=/etc/hostname").unwrap_err();
        assert!(err.contains("no PEM certificate"), "{err}");
    }

    #[test]
    fn system_roots_imply_and_require_verify_full() {
        let err = parse("postgres://u@h/d?sslmode=require&sslrootcert=system").unwrap_err();
        assert!(err.contains("verify-full"), "{err}");
        match parse("postgres://u@h/d?sslrootcert=system") {
            Ok(db) => assert_eq!(db.ssl_mode, SslMode::VerifyFull),
            Err(err) => assert!(err.contains("platform's trust store"), "{err}"),
        }
    }

    #[test]
    fn bad_values_are_named_and_the_password_never_echoed() {
        let err = parse("postgres://u:hunter2@h/d?sslmode=always").unwrap_err();
        assert!(err.contains("sslmode") && err.contains("verify-full"), "{err}");
        let err = parse("postgres://u:hunter2@h/d?sslcert=client.pem").unwrap_err();
        assert!(err.contains("sslcert") && !err.contains("hunter2"), "{err}");
        let err = parse("mysql://u:hunter2@h/d").unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
    }
}
