//! A test PKI made with the `openssl` CLI.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{require, run_ok, temp_dir};

/// A CA, a server certificate for 127.0.0.1 and localhost, and client
/// certificate directories in libnbd's layout (`ca-cert.pem`,
/// `client-cert.pem`, `client-key.pem`), all in one temporary directory.
pub struct Pki {
    /// Where every file lives.
    pub dir: tempfile::TempDir,
}

impl Pki {
    /// A new CA and server certificate; fails the test without `openssl`.
    #[track_caller]
    pub fn new() -> Pki {
        require("openssl");
        let pki = Pki { dir: temp_dir() };
        openssl(
            pki.dir.path(),
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca-key.pem",
                "-out",
                "ca-cert.pem",
                "-days",
                "2",
                "-subj",
                "/CN=blockseal test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        pki.issue(
            "server",
            "/CN=localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        );
        pki
    }

    /// The server certificate, its key and the CA certificate.
    pub fn server_files(&self) -> (PathBuf, PathBuf, PathBuf) {
        let d = self.dir.path();
        (
            d.join("server-cert.pem"),
            d.join("server-key.pem"),
            d.join("ca-cert.pem"),
        )
    }

    /// A client directory with a certificate for `/CN=<name>` carrying the
    /// subject alternative names `san` (e.g. `URI:blockseal:tenant:acme`), or
    /// none.
    #[track_caller]
    pub fn client(&self, name: &str, san: Option<&str>) -> PathBuf {
        let mut ext = String::from("extendedKeyUsage=clientAuth\n");
        if let Some(san) = san {
            ext.push_str(&format!("subjectAltName={san}\n"));
        }
        self.issue(name, &format!("/CN={name}"), &ext);
        let d = self.dir.path();
        let out = self.ca_only(&format!("client-{name}"));
        for (from, to) in [
            (format!("{name}-cert.pem"), "client-cert.pem"),
            (format!("{name}-key.pem"), "client-key.pem"),
        ] {
            std::fs::copy(d.join(&from), out.join(to))
                .unwrap_or_else(|e| panic!("copying {from}: {e}"));
        }
        out
    }

    /// A client directory whose certificate names `tenant` the way the server
    /// reads it (URI SAN `blockseal:tenant:<tenant>`).
    #[track_caller]
    pub fn tenant_client(&self, name: &str, tenant: &str) -> PathBuf {
        self.client(name, Some(&format!("URI:blockseal:tenant:{tenant}")))
    }

    /// A client directory `name` with the CA certificate and no client
    /// certificate.
    #[track_caller]
    pub fn ca_only(&self, name: &str) -> PathBuf {
        let d = self.dir.path();
        let out = d.join(name);
        std::fs::create_dir_all(&out).unwrap_or_else(|e| panic!("creating {}: {e}", out.display()));
        std::fs::copy(d.join("ca-cert.pem"), out.join("ca-cert.pem"))
            .unwrap_or_else(|e| panic!("copying the CA certificate: {e}"));
        out
    }

    #[track_caller]
    fn issue(&self, name: &str, subject: &str, extensions: &str) {
        let d = self.dir.path();
        let (key, csr, cert, ext) = (
            format!("{name}-key.pem"),
            format!("{name}.csr"),
            format!("{name}-cert.pem"),
            format!("{name}.ext"),
        );
        std::fs::write(
            d.join(&ext),
            format!("basicConstraints=CA:FALSE\n{extensions}"),
        )
        .unwrap_or_else(|e| panic!("writing {ext}: {e}"));
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                subject,
            ],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-out",
                &cert,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

#[track_caller]
fn openssl(dir: &Path, args: &[&str]) {
    run_ok(Command::new("openssl").current_dir(dir).args(args));
}
