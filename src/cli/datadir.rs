//! The data dir of `serve`: created private, and home of the admin token
//! when `AGENTPLANE_ADMIN_TOKEN` does not give one.

use anyhow::Context;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Creates the data dir if needed and makes it mode 0700 whether or not it
/// existed: it holds the admin token and every tenant's data (the AOF), and
/// a dir made by someone else with 0755 would let every local user read
/// them.
pub(super) fn ensure_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private (mode 0700)", dir.display()))?;
    Ok(())
}

/// The admin token: `AGENTPLANE_ADMIN_TOKEN` if set, else the one in
/// `<data>/admin-token`, generated (mode 0600) on first use. Answers the
/// token and whether it came from the file.
pub(super) fn admin_token(data_dir: &Path) -> anyhow::Result<(String, Option<PathBuf>)> {
    if let Ok(t) = std::env::var("AGENTPLANE_ADMIN_TOKEN")
        && !t.trim().is_empty()
    {
        return Ok((t.trim().to_string(), None));
    }
    ensure_dir(data_dir)?;
    let path = data_dir.join("admin-token");
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok((t.trim().to_string(), Some(path))),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let mut secret = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut secret);
    let token = format!("admin.{}", hex::encode(secret));
    write_private(&path, &token, true)?;
    Ok((token, Some(path)))
}

/// Writes `text` and a newline to `path`, mode 0600, synced; `replace`:
/// over whatever is there, else only if nothing is (two processes starting
/// at once must not each write their own secret).
fn write_private(path: &Path, text: &str, replace: bool) -> anyhow::Result<()> {
    let mut open = std::fs::OpenOptions::new();
    open.write(true).mode(0o600);
    if replace {
        open.create(true).truncate(true);
    } else {
        open.create_new(true);
    }
    let mut f = open
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    writeln!(f, "{text}")?;
    f.sync_all()?;
    Ok(())
}

/// 32 random bytes.
pub(super) fn random_secret() -> [u8; 32] {
    let mut secret = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut secret);
    secret
}

/// The callback signing secret of `AGENTPLANE_CALLBACK_SECRET` (any text,
/// hashed to 32 bytes), if set.
pub(super) fn callback_secret_env() -> anyhow::Result<Option<[u8; 32]>> {
    use sha2::Digest;
    match std::env::var("AGENTPLANE_CALLBACK_SECRET") {
        Ok(s) if s.trim().len() >= 16 => Ok(Some(sha2::Sha256::digest(s.trim().as_bytes()).into())),
        Ok(s) if !s.trim().is_empty() => {
            anyhow::bail!("AGENTPLANE_CALLBACK_SECRET must be at least 16 characters")
        }
        _ => Ok(None),
    }
}

/// The callback signing secret: `AGENTPLANE_CALLBACK_SECRET` if set, else
/// the one in `<data>/callback-secret`, generated (mode 0600) on first use,
/// so tenants' keys survive a restart.
pub(super) fn callback_secret(data_dir: &Path) -> anyhow::Result<[u8; 32]> {
    if let Some(s) = callback_secret_env()? {
        return Ok(s);
    }
    ensure_dir(data_dir)?;
    let path = data_dir.join("callback-secret");
    match std::fs::read_to_string(&path) {
        Ok(t) => {
            let mut out = [0u8; 32];
            if hex::decode_to_slice(t.trim(), &mut out).is_ok() {
                return Ok(out);
            }
            anyhow::bail!("{} is not 64 hex digits", path.display());
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let secret = random_secret();
    write_private(&path, &hex::encode(secret), false)?;
    Ok(secret)
}

/// The secrets key of `AGENTPLANE_SECRETS_KEY` (at least 16 characters),
/// if set.
pub(super) fn secrets_key_env() -> anyhow::Result<Option<crate::secrets::SecretsKey>> {
    match std::env::var("AGENTPLANE_SECRETS_KEY") {
        Ok(s) if !s.trim().is_empty() => crate::secrets::SecretsKey::from_passphrase(s.trim())
            .map(Some)
            .map_err(|e| anyhow::anyhow!("AGENTPLANE_SECRETS_KEY: {e}")),
        _ => Ok(None),
    }
}

/// The secrets key: `AGENTPLANE_SECRETS_KEY` if set, else the one in
/// `<data>/secrets-key`, generated (mode 0600) on first use, so `serve`
/// keeps tenants' secrets across restarts.
pub(super) fn secrets_key(data_dir: &Path) -> anyhow::Result<crate::secrets::SecretsKey> {
    if let Some(k) = secrets_key_env()? {
        return Ok(k);
    }
    ensure_dir(data_dir)?;
    let path = data_dir.join("secrets-key");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let text = hex::encode(random_secret());
            write_private(&path, &text, false)?;
            text
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    crate::secrets::SecretsKey::from_passphrase(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_token_is_generated_once_and_private() {
        let dir = tempfile::tempdir().unwrap();
        if std::env::var("AGENTPLANE_ADMIN_TOKEN").is_ok() {
            // The variable wins by design; nothing of the file to test.
            return;
        }
        let (a, path) = admin_token(dir.path()).unwrap();
        let path = path.unwrap();
        let (b, _) = admin_token(dir.path()).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
