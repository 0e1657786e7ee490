//! Auth tokens, as `--auth-token` chooses (etcd's `simple_token.go` and `jwt.go`).
//!
//! - `simple`: `<16 random letters>.<raft index>`, held in every member's memory. The random
//!   part comes from the proposing member, the index from the log entry, so every member holds
//!   the same token. A token unused for `--auth-token-ttl` is forgotten; tokens do not survive a
//!   restart (clients authenticate again).
//! - `jwt,pub-key=F,priv-key=F,sign-method=M[,ttl=D]`: signed claims `username`, `revision`
//!   and `exp`, checked by signature on any member; nothing is held.

use super::AuthInfo;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::time::{Duration, Instant};

const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
const SIMPLE_TOKEN_LENGTH: usize = 16;
/// etcd's default JWT lifetime.
const JWT_DEFAULT_TTL: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("auth: invalid auth options")]
    InvalidOpts,
    #[error("auth: invalid auth signature method")]
    InvalidMethod,
    #[error("auth: missing key data")]
    MissingKey,
    #[error("auth: token signing attempted with verify-only key")]
    VerifyOnly,
    #[error("auth: {0}")]
    Key(String),
}

pub enum Tokens {
    Simple(SimpleTokens),
    Jwt(JwtTokens),
}

impl Tokens {
    /// Parses `--auth-token` (etcd's `decomposeOpts` and provider choice).
    pub fn from_flag(opts: &str, simple_ttl: Duration) -> Result<Tokens, TokenError> {
        let mut parts = opts.split(',');
        let kind = parts.next().unwrap_or_default();
        let mut map = HashMap::new();
        for p in parts {
            let mut kv = p.split('=');
            let (Some(k), Some(v), None) = (kv.next(), kv.next(), kv.next()) else {
                return Err(TokenError::InvalidOpts);
            };
            if map.insert(k.to_string(), v.to_string()).is_some() {
                return Err(TokenError::InvalidOpts);
            }
        }
        match kind {
            "simple" => Ok(Tokens::Simple(SimpleTokens::new(simple_ttl))),
            "jwt" => Ok(Tokens::Jwt(JwtTokens::new(&map)?)),
            _ => Err(TokenError::InvalidOpts),
        }
    }

    /// The random part of a new simple token (empty for JWT).
    pub fn prefix(&self) -> String {
        match self {
            Tokens::Simple(_) => {
                use rand::Rng;
                let mut rng = rand::rng();
                (0..SIMPLE_TOKEN_LENGTH)
                    .map(|_| LETTERS[rng.random_range(0..LETTERS.len())] as char)
                    .collect()
            }
            Tokens::Jwt(_) => String::new(),
        }
    }

    /// The token a successful Authenticate entry at `index` gives `username`.
    pub fn assign(
        &self,
        username: &str,
        revision: u64,
        prefix: &str,
        index: u64,
    ) -> Result<String, TokenError> {
        match self {
            Tokens::Simple(s) => {
                let token = format!("{prefix}.{index}");
                s.assign(username, &token);
                Ok(token)
            }
            Tokens::Jwt(j) => j.sign(username, revision),
        }
    }

    /// The raft index a simple token was assigned at: a member must have applied it before
    /// it can know the token.
    pub fn index_of(&self, token: &str) -> Option<u64> {
        match self {
            Tokens::Simple(_) => {
                let (_, index) = token.split_once('.')?;
                if index.contains('.') {
                    return None;
                }
                index.parse().ok()
            }
            Tokens::Jwt(_) => None,
        }
    }

    /// Who a token stands for; a simple token's use extends its life. `revision` is the auth
    /// store's current revision (a simple token is always as new as the store; a JWT carries
    /// the revision it was issued at).
    pub fn info(&self, token: &str, revision: u64) -> Option<AuthInfo> {
        match self {
            Tokens::Simple(s) => {
                self.index_of(token)?;
                s.info(token)
                    .map(|username| AuthInfo { username, revision })
            }
            Tokens::Jwt(j) => j.verify(token),
        }
    }

    pub fn enable(&self) {
        if let Tokens::Simple(s) = self {
            s.enabled.lock().0 = true;
        }
    }

    /// Auth disabled: every simple token is forgotten.
    pub fn disable(&self) {
        if let Tokens::Simple(s) = self {
            let mut st = s.enabled.lock();
            st.0 = false;
            st.1.clear();
        }
    }

    /// A user deleted or given a new password loses its simple tokens.
    pub fn invalidate_user(&self, username: &str) {
        if let Tokens::Simple(s) = self {
            s.enabled.lock().1.retain(|_, (u, _)| u != username);
        }
    }
}

/// token -> (user, expiry).
type Held = HashMap<String, (String, Instant)>;

pub struct SimpleTokens {
    ttl: Duration,
    /// (enabled, the tokens held).
    enabled: Mutex<(bool, Held)>,
}

impl SimpleTokens {
    fn new(ttl: Duration) -> Self {
        SimpleTokens {
            // etcd's default when the flag gives none.
            ttl: if ttl.is_zero() {
                Duration::from_secs(300)
            } else {
                ttl
            },
            enabled: Mutex::new((false, HashMap::new())),
        }
    }

    fn assign(&self, username: &str, token: &str) {
        let mut st = self.enabled.lock();
        if !st.0 {
            return;
        }
        let now = Instant::now();
        // Expired tokens go here rather than on a timer: the map only grows on assignment.
        st.1.retain(|_, (_, exp)| *exp > now);
        st.1.insert(token.to_string(), (username.to_string(), now + self.ttl));
    }

    fn info(&self, token: &str) -> Option<String> {
        let mut st = self.enabled.lock();
        let now = Instant::now();
        let (user, exp) = st.1.get_mut(token)?;
        if *exp <= now {
            st.1.remove(token);
            return None;
        }
        *exp = now + self.ttl;
        Some(user.clone())
    }
}

pub struct JwtTokens {
    alg: Algorithm,
    ttl: Duration,
    encode: Option<EncodingKey>,
    decode: DecodingKey,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Claims {
    username: String,
    revision: u64,
    exp: u64,
}

impl JwtTokens {
    fn new(opts: &HashMap<String, String>) -> Result<Self, TokenError> {
        let ttl = match opts.get("ttl").filter(|t| !t.is_empty()) {
            Some(t) => crate::duration::parse_go_duration(t).ok_or(TokenError::InvalidOpts)?,
            None => JWT_DEFAULT_TTL,
        };
        let method = opts.get("sign-method").map(String::as_str).unwrap_or("");
        let alg: Algorithm = method.parse().map_err(|_| TokenError::InvalidMethod)?;
        let read = |k: &str| -> Result<Option<Vec<u8>>, TokenError> {
            match opts.get(k).filter(|f| !f.is_empty()) {
                Some(f) => std::fs::read(f)
                    .map(Some)
                    .map_err(|e| TokenError::Key(format!("{k} {f}: {e}"))),
                None => Ok(None),
            }
        };
        let (public, private) = (read("pub-key")?, read("priv-key")?);
        let key_err = |e: jsonwebtoken::errors::Error| TokenError::Key(e.to_string());
        let (encode, decode) = match alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                let secret = private.ok_or(TokenError::MissingKey)?;
                (
                    Some(EncodingKey::from_secret(&secret)),
                    DecodingKey::from_secret(&secret),
                )
            }
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => {
                // oxcd verifies with the public key file: etcd derives it from the private
                // key when only that is given, which oxcd does not.
                let public = public.ok_or(TokenError::MissingKey)?;
                let encode = private
                    .map(|p| EncodingKey::from_rsa_pem(&p).map_err(key_err))
                    .transpose()?;
                (encode, DecodingKey::from_rsa_pem(&public).map_err(key_err)?)
            }
            Algorithm::ES256 | Algorithm::ES384 => {
                let public = public.ok_or(TokenError::MissingKey)?;
                let encode = private
                    .map(|p| EncodingKey::from_ec_pem(&p).map_err(key_err))
                    .transpose()?;
                (encode, DecodingKey::from_ec_pem(&public).map_err(key_err)?)
            }
            Algorithm::EdDSA => return Err(TokenError::InvalidMethod),
        };
        Ok(JwtTokens {
            alg,
            ttl,
            encode,
            decode,
        })
    }

    fn sign(&self, username: &str, revision: u64) -> Result<String, TokenError> {
        let key = self.encode.as_ref().ok_or(TokenError::VerifyOnly)?;
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            + self.ttl;
        let claims = Claims {
            username: username.to_string(),
            revision,
            exp: exp.as_secs(),
        };
        jsonwebtoken::encode(&Header::new(self.alg), &claims, key)
            .map_err(|e| TokenError::Key(e.to_string()))
    }

    fn verify(&self, token: &str) -> Option<AuthInfo> {
        let mut v = Validation::new(self.alg);
        // jwt-go, which etcd uses, allows no clock leeway and needs no claim but `exp`.
        v.leeway = 0;
        v.required_spec_claims.clear();
        v.required_spec_claims.insert("exp".into());
        let data = jsonwebtoken::decode::<Claims>(token, &self.decode, &v).ok()?;
        Some(AuthInfo {
            username: data.claims.username,
            revision: data.claims.revision,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_parsed_as_etcd_does() {
        assert!(matches!(
            Tokens::from_flag("simple", Duration::ZERO),
            Ok(Tokens::Simple(_))
        ));
        assert_eq!(
            Tokens::from_flag("nope", Duration::ZERO).err(),
            Some(TokenError::InvalidOpts)
        );
        assert_eq!(
            Tokens::from_flag("jwt,ttl=1s,ttl=2s", Duration::ZERO).err(),
            Some(TokenError::InvalidOpts)
        );
        assert_eq!(
            Tokens::from_flag("jwt,sign-method=XX1", Duration::ZERO).err(),
            Some(TokenError::InvalidMethod)
        );
        assert_eq!(
            Tokens::from_flag("jwt,sign-method=HS256", Duration::ZERO).err(),
            Some(TokenError::MissingKey)
        );
    }

    #[test]
    fn simple_tokens_expire_when_unused_and_die_with_disable() {
        let t = Tokens::from_flag("simple", Duration::from_millis(200)).unwrap();
        t.enable();
        let tok = t.assign("u", 3, "abc", 7).unwrap();
        assert_eq!(tok, "abc.7");
        assert_eq!(t.index_of(&tok), Some(7));
        assert_eq!(t.info(&tok, 3).unwrap().username, "u");
        std::thread::sleep(Duration::from_millis(120));
        assert!(t.info(&tok, 3).is_some(), "a use extends the life");
        std::thread::sleep(Duration::from_millis(120));
        assert!(t.info(&tok, 3).is_some());
        std::thread::sleep(Duration::from_millis(250));
        assert!(t.info(&tok, 3).is_none(), "unused past the TTL");
        let tok = t.assign("u", 3, "def", 8).unwrap();
        t.invalidate_user("u");
        assert!(t.info(&tok, 3).is_none());
        let tok = t.assign("u", 3, "ghi", 9).unwrap();
        t.disable();
        assert!(t.info(&tok, 3).is_none());
    }

    #[test]
    fn jwt_tokens_carry_user_and_revision_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"0123456789abcdef").unwrap();
        let flag = format!("jwt,priv-key={},sign-method=HS256,ttl=1s", secret.display());
        let t = Tokens::from_flag(&flag, Duration::ZERO).unwrap();
        let tok = t.assign("alice", 5, "", 1).unwrap();
        let info = t.info(&tok, 9).unwrap();
        assert_eq!((info.username.as_str(), info.revision), ("alice", 5));
        assert!(t.info(&format!("{tok}x"), 9).is_none());
        std::thread::sleep(Duration::from_millis(2100));
        assert!(t.info(&tok, 9).is_none(), "expired");
    }
}
