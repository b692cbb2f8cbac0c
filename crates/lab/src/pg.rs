//! A throwaway PostgreSQL server for the demo and the tests: `initdb` and
//! `pg_ctl` in a temporary directory, listening on a free loopback port,
//! password authentication (SCRAM), optionally TLS only; stopped and
//! deleted on drop. As root (PostgreSQL refuses to run as root) the
//! server runs as the `postgres` user through `runuser`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::LabError;

fn err(what: impl Into<String>) -> LabError {
    LabError::Postgres(what.into())
}

/// `initdb` and `pg_ctl`: on the PATH, else the newest under
/// `/usr/lib/postgresql/*/bin` (Debian's layout).
///
/// # Errors
/// When neither is found (with how to install them).
pub fn binaries() -> Result<(PathBuf, PathBuf), LabError> {
    let on_path = |name: &str| {
        std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|f| f.is_file()))
    };
    if let (Some(i), Some(c)) = (on_path("initdb"), on_path("pg_ctl")) {
        return Ok((i, c));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => Ok((bin.join("initdb"), bin.join("pg_ctl"))),
        None => Err(err(
            "initdb and pg_ctl not found (on the PATH or under /usr/lib/postgresql/*/bin); install PostgreSQL (Debian: apt-get install postgresql)",
        )),
    }
}

/// A running server; stopped (immediately) and removed on drop.
pub struct TempPostgres {
    dir: tempfile::TempDir,
    pg_ctl: PathBuf,
    as_postgres: bool,
    /// Its loopback port.
    pub port: u16,
    /// The superuser it was made with.
    pub user: String,
    /// That user's password.
    pub password: String,
}

impl std::fmt::Debug for TempPostgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TempPostgres")
            .field("port", &self.port)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// The uid and gid of the `postgres` user, from /etc/passwd.
fn postgres_ids() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&"postgres")).then(|| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))?
    })
}

impl TempPostgres {
    /// Starts a server with password authentication on 127.0.0.1.
    ///
    /// # Errors
    /// When PostgreSQL is not installed or does not start.
    pub fn start() -> Result<Self, LabError> {
        Self::start_inner(None)
    }

    /// Starts a server that accepts TLS connections only, with the given
    /// certificate chain and key (PEM).
    ///
    /// # Errors
    /// As [`TempPostgres::start`].
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Result<Self, LabError> {
        Self::start_inner(Some((cert_pem, key_pem)))
    }

    fn run(&self, cmd: &Path, args: &[&str]) -> Result<(), LabError> {
        run(self.as_postgres, cmd, args)
    }

    fn start_inner(tls: Option<(&str, &str)>) -> Result<Self, LabError> {
        let (initdb, pg_ctl) = binaries()?;
        let dir = tempfile::tempdir().map_err(|e| err(e.to_string()))?;
        let as_postgres = rustix_is_root();
        let ids = if as_postgres {
            Some(
                postgres_ids()
                    .ok_or_else(|| err("running as root and there is no postgres user to run the server as"))?,
            )
        } else {
            None
        };
        let chown = |p: &Path| -> Result<(), LabError> {
            if let Some((uid, gid)) = ids {
                std::os::unix::fs::chown(p, Some(uid), Some(gid)).map_err(|e| err(e.to_string()))?;
            }
            Ok(())
        };
        chown(dir.path())?;
        let user = "cleanroom".to_string();
        let password = hex::encode(rand_bytes::<16>()?);
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, &password).map_err(|e| err(e.to_string()))?;
        chown(&pwfile)?;
        let data = dir.path().join("data");
        let s = |p: &Path| p.display().to_string();
        run(
            as_postgres,
            &initdb,
            &[
                "-D",
                &s(&data),
                "-U",
                &user,
                "--auth=scram-sha-256",
                &format!("--pwfile={}", s(&pwfile)),
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )?;
        let mut conf = String::from("listen_addresses = '127.0.0.1'\nunix_socket_directories = ''\nfsync = off\n");
        if let Some((cert, key)) = tls {
            let (c, k) = (data.join("server.crt"), data.join("server.key"));
            std::fs::write(&c, cert).map_err(|e| err(e.to_string()))?;
            std::fs::write(&k, key).map_err(|e| err(e.to_string()))?;
            std::fs::set_permissions(&k, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .map_err(|e| err(e.to_string()))?;
            chown(&c)?;
            chown(&k)?;
            conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
            // TLS only: a plain connection is rejected.
            std::fs::write(
                data.join("pg_hba.conf"),
                "hostssl all all 127.0.0.1/32 scram-sha-256\nhostnossl all all 0.0.0.0/0 reject\n",
            )
            .map_err(|e| err(e.to_string()))?;
        }
        let auto = data.join("postgresql.auto.conf");
        std::fs::write(&auto, conf).map_err(|e| err(e.to_string()))?;
        chown(&auto)?;
        let port = free_port()?;
        let me = Self {
            dir,
            pg_ctl,
            as_postgres,
            port,
            user,
            password,
        };
        me.run(
            &me.pg_ctl,
            &[
                "-D",
                &s(&data),
                "-l",
                &s(&me.dir.path().join("log")),
                "-o",
                &format!("-p {port}"),
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
        .map_err(|e| {
            let log = std::fs::read_to_string(me.dir.path().join("log")).unwrap_or_default();
            err(format!("{e}; server log: {log}"))
        })?;
        Ok(me)
    }

    /// A connection as the superuser (no TLS).
    ///
    /// # Errors
    /// When the server cannot be reached.
    pub fn client(&self) -> Result<postgres::Client, LabError> {
        postgres::Config::new()
            .host("127.0.0.1")
            .port(self.port)
            .user(&self.user)
            .password(&self.password)
            .dbname("postgres")
            .connect(postgres::NoTls)
            .map_err(|e| err(e.to_string()))
    }

    /// Runs SQL statements as the superuser.
    ///
    /// # Errors
    /// The server's error.
    pub fn execute(&self, sql: &str) -> Result<(), LabError> {
        self.client()?.batch_execute(sql).map_err(|e| err(e.to_string()))
    }

    /// Copies a CSV file with a header into `table` (its columns in the
    /// file's order).
    ///
    /// # Errors
    /// The server's error, or the file's.
    pub fn copy_csv(&self, table: &str, csv: &Path) -> Result<u64, LabError> {
        use std::io::Write;
        let mut c = self.client()?;
        let mut w = c
            .copy_in(&format!(
                "COPY \"{}\" FROM STDIN WITH (FORMAT csv, HEADER true)",
                table.replace('"', "\"\"")
            ))
            .map_err(|e| err(e.to_string()))?;
        let bytes = std::fs::read(csv).map_err(|e| err(e.to_string()))?;
        w.write_all(&bytes).map_err(|e| err(e.to_string()))?;
        w.finish().map_err(|e| err(e.to_string()))
    }

    /// A fresh password (32 hex digits from the OS generator) for a role.
    ///
    /// # Errors
    /// When the OS generator fails.
    pub fn random_password(&self) -> Result<String, LabError> {
        Ok(hex::encode(rand_bytes::<16>()?))
    }
}

/// Writes a password to a file of mode 0600 (for a node's `password_file`).
///
/// # Errors
/// When it cannot be written.
pub fn write_secret(path: &Path, secret: &str) -> Result<(), LabError> {
    std::fs::write(path, format!("{secret}\n")).map_err(|e| err(e.to_string()))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).map_err(|e| err(e.to_string()))
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data").display().to_string();
        let _ = self.run(&self.pg_ctl, &["-D", &data, "-m", "immediate", "-w", "stop"]);
    }
}

fn run(as_postgres: bool, cmd: &Path, args: &[&str]) -> Result<(), LabError> {
    let mut c = if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(cmd);
        c
    } else {
        Command::new(cmd)
    };
    let out = c
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| err(format!("{}: {e}", cmd.display())))?;
    if !out.status.success() {
        return Err(err(format!(
            "{} failed: {}{}",
            cmd.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

fn free_port() -> Result<u16, LabError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| err(e.to_string()))?;
    l.local_addr().map(|a| a.port()).map_err(|e| err(e.to_string()))
}

fn rustix_is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn rand_bytes<const N: usize>() -> Result<[u8; N], LabError> {
    let mut b = [0u8; N];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| err("the OS generator failed"))?;
    Ok(b)
}
