//! The Ed25519 keys that sign access tokens, and the JWKS that publishes their public halves.
//! Keys rotate: a directory holds every live key, the last by name signs, the others still
//! verify until their file is removed; `keel keys rotate` adds a key and a running identity
//! picks it up when it reloads the directory.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use keel_auth::{AccessClaims, VerificationKey};
use sha2::{Digest as _, Sha256};

use crate::proto::keel::identity::v1::JsonWebKey;

/// The RFC 8410 PKCS#8 v1 prefix of an Ed25519 private key; the 32-byte seed follows.
const PKCS8_V1_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// Where the development keys live under the data dir.
const DEV_KEY_DIR: &str = "signing-keys";
/// The first development key's file: it sorts before every rotated key.
const FIRST_KEY_FILE: &str = "0-initial.pem";
/// Where earlier versions kept their one development key.
const LEGACY_KEY_FILE: &str = "identity-signing-key.pem";

/// One key: its id, its public half, and what signs with it.
struct Key {
    kid: String,
    x: String,
    encoding: EncodingKey,
    file: PathBuf,
}

/// Where the keys come from.
#[derive(Debug, Clone)]
enum Origin {
    /// One provisioned file: it signs, and no other key verifies.
    File(PathBuf),
    /// A directory of PEM files: every one verifies, the last by name signs.
    Dir(PathBuf),
}

/// The live signing keys.
pub struct SigningKeys {
    origin: Origin,
    /// Oldest first; the last signs. Never empty.
    keys: RwLock<Arc<Vec<Key>>>,
    /// Whether these keys were generated for development rather than provisioned.
    pub generated: bool,
}

impl std::fmt::Debug for SigningKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKeys")
            .field("origin", &self.origin)
            .field("kids", &self.kids())
            .field("generated", &self.generated)
            .finish()
    }
}

impl SigningKeys {
    /// The provisioned keys at `path`: one PKCS#8 file (PEM or DER), or a directory of them.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let origin = if path.is_dir() {
            Origin::Dir(path.to_owned())
        } else {
            Origin::File(path.to_owned())
        };
        let keys = read(&origin)?;
        Ok(Self {
            origin,
            keys: RwLock::new(Arc::new(keys)),
            generated: false,
        })
    }

    /// The development keys under `data_dir`, the first generated on first use and kept so that
    /// tokens survive restarts. Processes that share the data dir and start together agree on
    /// one first key: its file appears whole or not at all, and a process that loses the race
    /// loads the winner's.
    pub fn development(data_dir: &Path) -> anyhow::Result<Self> {
        let dir = development_dir(data_dir);
        let first = dir.join(FIRST_KEY_FILE);
        if !first.exists() {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("create key dir {}", dir.display()))?;
            let legacy = data_dir.join(LEGACY_KEY_FILE);
            let pem = match std::fs::read(&legacy) {
                Ok(pem) => pem,
                Err(_) => new_key_pem()?,
            };
            publish_private(&first, &pem)?;
        }
        let mut keys = Self::load(&dir)?;
        keys.generated = true;
        Ok(keys)
    }

    /// Reads the keys again (a rotation or a removal); keeps the ones it has when the directory
    /// cannot be read or holds no key. True when the set changed.
    pub fn reload(&self) -> anyhow::Result<bool> {
        let keys = read(&self.origin)?;
        let changed = {
            let now = self.keys.read().unwrap_or_else(|e| e.into_inner());
            now.iter().map(|k| &k.kid).ne(keys.iter().map(|k| &k.kid))
        };
        if changed {
            tracing::info!(kids = ?keys.iter().map(|k| &k.kid).collect::<Vec<_>>(), "signing keys changed");
            *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        }
        Ok(changed)
    }

    fn current(&self) -> Arc<Vec<Key>> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Every live key id, oldest first; the last signs.
    pub fn kids(&self) -> Vec<String> {
        self.current().iter().map(|k| k.kid.clone()).collect()
    }

    /// A compact JWS of `claims`, signed by the current key and naming its `kid`.
    pub fn sign(&self, claims: &AccessClaims) -> anyhow::Result<String> {
        let keys = self.current();
        let key = keys.last().context("no signing key")?;
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, claims, &key.encoding).context("sign an access token")
    }

    /// The public keys, as GetJwks returns them.
    pub fn jwks(&self) -> Vec<JsonWebKey> {
        self.current()
            .iter()
            .map(|k| JsonWebKey {
                kty: "OKP".into(),
                crv: "Ed25519".into(),
                x: k.x.clone(),
                kid: k.kid.clone(),
                alg: "EdDSA".into(),
                r#use: "sig".into(),
            })
            .collect()
    }

    /// The public keys, as the token verifier takes them.
    pub fn verification_keys(&self) -> Vec<VerificationKey> {
        self.current()
            .iter()
            .map(|k| VerificationKey {
                kid: k.kid.clone(),
                x: k.x.clone(),
            })
            .collect()
    }
}

/// The directory of development keys under `data_dir`.
pub fn development_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(DEV_KEY_DIR)
}

/// Adds a new key to the key directory `dir`; it signs from the next reload on, and the others
/// keep verifying. Returns its key id.
pub fn rotate(dir: &Path) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir).with_context(|| format!("create key dir {}", dir.display()))?;
    let pem = new_key_pem()?;
    let key = parse(&pem, dir)?;
    // Names sort by time, after the first key's.
    let name = format!(
        "{}-{}.pem",
        chrono::Utc::now().format("%Y%m%dT%H%M%S%.6fZ"),
        &key.kid[..8]
    );
    publish_private(&dir.join(name), &pem)?;
    Ok(key.kid)
}

/// Removes the key `kid` from `dir`: tokens it signed stop verifying once verifiers refresh.
/// The signing key (the last) cannot be removed; rotate first.
pub fn remove(dir: &Path, kid: &str) -> anyhow::Result<()> {
    let keys = read(&Origin::Dir(dir.to_owned()))?;
    let position = keys
        .iter()
        .position(|k| k.kid == kid)
        .with_context(|| format!("no key {kid} in {}", dir.display()))?;
    anyhow::ensure!(
        position + 1 < keys.len(),
        "{kid} is the signing key; rotate to a new key before removing it"
    );
    let file = &keys[position].file;
    std::fs::remove_file(file).with_context(|| format!("remove {}", file.display()))
}

/// Every key in `dir`, oldest first, as `kid` and file.
pub fn list(dir: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    Ok(read(&Origin::Dir(dir.to_owned()))?
        .into_iter()
        .map(|k| (k.kid, k.file))
        .collect())
}

fn new_key_pem() -> anyhow::Result<Vec<u8>> {
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let pem = key
        .to_pkcs8_pem(Default::default())
        .map_err(|e| anyhow::anyhow!("encode a signing key: {e}"))?;
    Ok(pem.as_bytes().to_vec())
}

fn read(origin: &Origin) -> anyhow::Result<Vec<Key>> {
    match origin {
        Origin::File(path) => {
            let bytes = std::fs::read(path)
                .with_context(|| format!("read signing key {}", path.display()))?;
            Ok(vec![parse(&bytes, path)?])
        }
        Origin::Dir(dir) => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .with_context(|| format!("read key dir {}", dir.display()))?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "pem" || e == "der"))
                .collect();
            files.sort();
            let keys = files
                .iter()
                .map(|file| {
                    let bytes = std::fs::read(file)
                        .with_context(|| format!("read signing key {}", file.display()))?;
                    parse(&bytes, file)
                })
                .collect::<anyhow::Result<Vec<Key>>>()?;
            anyhow::ensure!(!keys.is_empty(), "no signing key in {}", dir.display());
            Ok(keys)
        }
    }
}

fn parse(bytes: &[u8], file: &Path) -> anyhow::Result<Key> {
    let key = match std::str::from_utf8(bytes) {
        Ok(pem) if pem.contains("-----BEGIN") => SigningKey::from_pkcs8_pem(pem),
        _ => SigningKey::from_pkcs8_der(bytes),
    }
    .map_err(|e| {
        anyhow::anyhow!(
            "signing key {} is not a PKCS#8 Ed25519 key: {e}",
            file.display()
        )
    })?;
    let mut der = PKCS8_V1_ED25519_PREFIX.to_vec();
    der.extend_from_slice(&key.to_bytes());
    let x = URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes());
    Ok(Key {
        kid: thumbprint(&x),
        x,
        encoding: EncodingKey::from_ed_der(&der),
        file: file.to_owned(),
    })
}

/// The RFC 7638 JWK thumbprint of an Ed25519 public key: a stable, content-derived key id.
fn thumbprint(x: &str) -> String {
    let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

/// Writes `bytes` to `path`, readable by the owner only, unless `path` exists already: written
/// beside it first, then linked into place (a link never replaces a file), so that no reader
/// sees it half-written.
fn publish_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let staged = path.with_extension(format!("{}.tmp", uuid::Uuid::new_v4().simple()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let written = options
        .open(&staged)
        .and_then(|mut file| file.write_all(bytes).and_then(|()| file.sync_all()))
        .with_context(|| format!("write {}", staged.display()));
    let linked = written.and_then(|()| match std::fs::hard_link(&staged, path) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            Err(e).with_context(|| format!("create {}", path.display()))
        }
        _ => Ok(()),
    });
    let _ = std::fs::remove_file(&staged);
    linked
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp() -> PathBuf {
        std::env::temp_dir().join(format!("keel-keys-{}", uuid::Uuid::new_v4()))
    }

    fn claims() -> AccessClaims {
        AccessClaims {
            sub: "s".into(),
            role: "user".into(),
            iss: "keel".into(),
            aud: "keel".into(),
            iat: 0,
            exp: 4_000_000_000,
            jti: "j".into(),
            generation: 0,
        }
    }

    fn kid_of(token: &str) -> String {
        jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
    }

    #[test]
    fn the_development_key_is_kept_across_restarts() {
        let dir = temp();
        let first = SigningKeys::development(&dir).unwrap();
        let second = SigningKeys::development(&dir).unwrap();
        assert_eq!(first.kids(), second.kids());
        assert!(second.generated);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn processes_starting_together_agree_on_one_development_key() {
        let dir = temp();
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
        let racers: Vec<_> = (0..8)
            .map(|_| {
                let (dir, barrier) = (dir.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    SigningKeys::development(&dir).map(|k| k.kids())
                })
            })
            .collect();
        let kids: std::collections::HashSet<Vec<String>> = racers
            .into_iter()
            .map(|r| r.join().unwrap().expect("every racer gets the key"))
            .collect();
        assert_eq!(kids.len(), 1, "one key for all: {kids:?}");
        let left: Vec<_> = std::fs::read_dir(development_dir(&dir)).unwrap().collect();
        assert_eq!(left.len(), 1, "no staged files left behind");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_earlier_versions_key_is_kept() {
        let dir = temp();
        std::fs::create_dir_all(&dir).unwrap();
        let legacy = new_key_pem().unwrap();
        std::fs::write(dir.join(LEGACY_KEY_FILE), &legacy).unwrap();
        let keys = SigningKeys::development(&dir).unwrap();
        assert_eq!(keys.kids(), vec![parse(&legacy, &dir).unwrap().kid]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_rotated_key_signs_and_the_earlier_ones_stay_published_until_removed() {
        let data = temp();
        let keys = SigningKeys::development(&data).unwrap();
        let first = keys.kids()[0].clone();
        assert_eq!(kid_of(&keys.sign(&claims()).unwrap()), first);

        let dir = development_dir(&data);
        let second = rotate(&dir).unwrap();
        assert!(keys.reload().unwrap());
        assert_eq!(keys.kids(), vec![first.clone(), second.clone()]);
        assert_eq!(kid_of(&keys.sign(&claims()).unwrap()), second);
        let published: Vec<String> = keys.jwks().into_iter().map(|k| k.kid).collect();
        assert_eq!(published, vec![first.clone(), second.clone()]);

        assert!(remove(&dir, &second).is_err(), "the signing key stays");
        remove(&dir, &first).unwrap();
        assert!(keys.reload().unwrap());
        assert_eq!(keys.kids(), vec![second.clone()]);
        assert_eq!(
            list(&dir)
                .unwrap()
                .into_iter()
                .map(|(kid, _)| kid)
                .collect::<Vec<_>>(),
            vec![second]
        );
        std::fs::remove_dir_all(data).unwrap();
    }

    #[test]
    fn a_signed_token_verifies_with_the_published_key() {
        let dir = temp();
        let keys = SigningKeys::development(&dir).unwrap();
        let token = keys.sign(&claims()).unwrap();
        let raw = URL_SAFE_NO_PAD.decode(&keys.jwks()[0].x).unwrap();
        let mut validation = jsonwebtoken::Validation::new(Algorithm::EdDSA);
        validation.set_audience(&["keel"]);
        let decoded = jsonwebtoken::decode::<AccessClaims>(
            &token,
            &jsonwebtoken::DecodingKey::from_ed_der(&raw),
            &validation,
        )
        .unwrap();
        assert_eq!(decoded.claims, claims());
        assert_eq!(kid_of(&token), keys.kids()[0]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
