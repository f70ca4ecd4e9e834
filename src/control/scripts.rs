//! The Lua scripts of `lua/`, loaded into Redis as one function library
//! (Redis 7 functions): `lua/lib.lua` first, then each script as a function
//! of its own. The library is loaded once per Redis node, so a call runs
//! only its own script: the helpers of `lib.lua` are not defined again on
//! every call (as they were when each script was sent with the library in
//! front of it, which cost more Redis instructions than most scripts' own
//! work). Each call is still one atomic `FCALL`.
//!
//! The library's name carries a hash of its text, so processes of two
//! versions share one Redis without replacing each other's code; a node
//! that lacks it (a fresh, restarted or newly added Redis) gets it on the
//! first call that finds it missing ([`Invocation::invoke_async`]).

use redis::{FromRedisValue, RedisResult, ToRedisArgs, aio::ConnectionLike};
use sha2::{Digest, Sha256};
use std::sync::LazyLock;

const LIB: &str = include_str!("../../lua/lib.lua");

/// One script of the library, called by name.
pub struct Function {
    name: &'static str,
    file: &'static str,
    text: &'static str,
}

macro_rules! scripts {
    ($($name:ident => $script:literal),* $(,)?) => {
        $(
            pub static $name: Function = Function {
                name: $script,
                file: concat!($script, ".lua"),
                text: include_str!(concat!("../../lua/", $script, ".lua")),
            };
        )*
        /// Every script, in the library's order.
        static ALL: [&Function; [$($script),*].len()] = [$(&$name),*];
    };
}

scripts! {
    SUBMIT => "submit",
    CLAIM => "claim",
    RENEW => "renew",
    FINALIZE => "finalize",
    CANCEL => "cancel",
    PROMOTE => "promote",
    REAP => "reap",
    RELEASE => "release",
    TENANT => "tenant",
    RETAIN => "retain",
    USAGE => "usage",
    LOG => "log",
    RETRY => "retry",
    HOOKS => "hooks",
    SECRET => "secret",
}

/// The library as loaded: its name, its text, and where each file starts.
struct Library {
    name: String,
    text: String,
    /// (first line of the file in `text`, 1-based; the file), in order.
    files: Vec<(usize, &'static str)>,
}

static LIBRARY: LazyLock<Library> = LazyLock::new(|| {
    // `lib.lua`, then each script as `local function run_<name>(KEYS, ARGV)`
    // around the file's text, then the registrations: each function starts
    // its call with `enter` (the shard's keys and gate, lua/lib.lua).
    let mut body = String::from(LIB);
    let mut files = vec![(2, "lib.lua")];
    for f in ALL {
        body.push_str(&format!("\nlocal function run_{}(KEYS, ARGV)\n", f.name));
        files.push((body.matches('\n').count() + 2, f.file));
        body.push_str(f.text);
        if !f.text.ends_with('\n') {
            body.push('\n');
        }
        body.push_str("end\n");
    }
    let hash = hex::encode(Sha256::digest(body.as_bytes()));
    let name = format!("agentplane_{}", &hash[..16]);
    let mut text = format!("#!lua name={name}\n{body}");
    files.push((text.matches('\n').count() + 1, "<registration>"));
    for f in ALL {
        text.push_str(&format!(
            "redis.register_function('{name}_{0}', function(keys, args)\n  \
             local refused = enter(keys)\n  if refused then return refused end\n  \
             return run_{0}(keys, args)\nend)\n",
            f.name
        ));
    }
    Library { name, text, files }
});

impl Function {
    /// A call of this script, its keys and arguments to add.
    pub fn prepare_invoke(&'static self) -> Invocation {
        Invocation {
            function: self,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }

    /// A call of this script with its first key.
    pub fn key<T: ToRedisArgs>(&'static self, key: T) -> Invocation {
        let mut inv = self.prepare_invoke();
        inv.key(key);
        inv
    }
}

/// One `FCALL` being built: keys, then arguments.
pub struct Invocation {
    function: &'static Function,
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl Invocation {
    pub fn key<T: ToRedisArgs>(&mut self, key: T) -> &mut Invocation {
        key.write_redis_args(&mut self.keys);
        self
    }

    pub fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Invocation {
        arg.write_redis_args(&mut self.args);
        self
    }

    /// Runs the call; a node without the library (`Function not found`)
    /// gets it (`FUNCTION LOAD`, to every primary of a cluster) and the call
    /// is sent again, once.
    pub async fn invoke_async<T: FromRedisValue, C: ConnectionLike>(
        &self,
        conn: &mut C,
    ) -> RedisResult<T> {
        let lib = &*LIBRARY;
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(format!("{}_{}", lib.name, self.function.name))
            .arg(self.keys.len())
            .arg(&self.keys)
            .arg(&self.args);
        match cmd.query_async(conn).await {
            Err(e) if e.to_string().contains("Function not found") => {
                load(conn).await?;
                cmd.query_async(conn).await
            }
            other => other,
        }
    }
}

/// Loads the library (REPLACE: the same name always carries the same text,
/// so replacing it changes nothing, where two callers load at once).
pub(super) async fn load<C: ConnectionLike>(conn: &mut C) -> RedisResult<()> {
    redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(&LIBRARY.text)
        .query_async(conn)
        .await
}

/// Rewrites each place a Lua runtime error names, `user_function:<line>` of
/// the library, into the file and line a reader opens: `lua/lib.lua:<line>`
/// or `lua/<script>.lua:<line>`. `None` when the message names no place.
pub(super) fn locate(msg: &str) -> Option<String> {
    const TAG: &str = "user_function:";
    if !msg.contains(TAG) {
        return None;
    }
    let lib = &*LIBRARY;
    let mut out = String::with_capacity(msg.len() + 16);
    let mut rest = msg;
    while let Some(at) = rest.find(TAG) {
        let head = &rest[..at];
        out.push_str(head.strip_suffix('@').unwrap_or(head));
        let tail = &rest[at + TAG.len()..];
        let n = tail.chars().take_while(char::is_ascii_digit).count();
        let place = tail[..n].parse::<usize>().ok().and_then(|line| {
            let (first, file) = lib.files.iter().rev().find(|(first, _)| line >= *first)?;
            Some(format!("lua/{file}:{}", line - first + 1))
        });
        out.push_str(place.as_deref().unwrap_or(TAG));
        rest = &tail[n..];
    }
    out.push_str(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_file_and_line_a_reader_opens() {
        let lib = &*LIBRARY;
        // Line 7 of claim.lua, as Redis names it in the library's text.
        let (first, _) = lib.files.iter().find(|(_, f)| *f == "claim.lua").unwrap();
        let line = first + 6;
        assert_eq!(
            lib.text.lines().nth(line - 1),
            include_str!("../../lua/claim.lua").lines().nth(6)
        );
        let msg = format!(
            "ERR user_function:{line}: boom script: {n}_claim, on @user_function:{line}.",
            n = lib.name
        );
        assert_eq!(
            locate(&msg).unwrap(),
            format!(
                "ERR lua/claim.lua:7: boom script: {}_claim, on lua/claim.lua:7.",
                lib.name
            )
        );
        // lib.lua's own lines keep their numbers (the library's first line
        // is its `#!lua` header).
        assert_eq!(lib.text.lines().nth(3 - 1 + 1), LIB.lines().nth(3 - 1));
        let msg = "x script: f, on @user_function:4.";
        assert!(locate(msg).unwrap().ends_with("on lua/lib.lua:3."));
        assert_eq!(locate("ERR something else"), None);
    }

    /// The names listed in `local <list> = { ... }` of lib.lua.
    fn listed(list: &str) -> Vec<&'static str> {
        let start = LIB
            .find(&format!("local {list} = {{"))
            .unwrap_or_else(|| panic!("{list} in lib.lua"));
        let end = start + LIB[start..].find('}').unwrap();
        LIB[start..end].split('\'').skip(1).step_by(2).collect()
    }

    /// Every field the scripts read from a table named `t` (`t.x`, `n(t, 'x')`),
    /// comments left out; in-memory marks (`_x`) are not fields.
    fn fields_read(t: &str) -> std::collections::BTreeSet<String> {
        let mut sources = vec![LIB];
        sources.extend([
            include_str!("../../lua/submit.lua"),
            include_str!("../../lua/claim.lua"),
            include_str!("../../lua/renew.lua"),
            include_str!("../../lua/finalize.lua"),
            include_str!("../../lua/cancel.lua"),
            include_str!("../../lua/promote.lua"),
            include_str!("../../lua/reap.lua"),
            include_str!("../../lua/release.lua"),
            include_str!("../../lua/tenant.lua"),
            include_str!("../../lua/retain.lua"),
            include_str!("../../lua/usage.lua"),
            include_str!("../../lua/log.lua"),
            include_str!("../../lua/retry.lua"),
        ]);
        let field = |s: &str| -> String {
            s.chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect()
        };
        let mut read = std::collections::BTreeSet::new();
        for src in sources {
            let code: String = src
                .lines()
                .map(|l| l.split("--").next().unwrap_or(""))
                .collect::<Vec<_>>()
                .join("\n");
            let src = code.as_str();
            for (i, _) in src.match_indices(&format!("{t}.")) {
                let before = src[..i].chars().last();
                if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                    continue; // e.g. `xJ.` is another table
                }
                read.insert(field(&src[i + t.len() + 1..]));
            }
            for (i, _) in src.match_indices(&format!("n({t}, '")) {
                read.insert(field(&src[i + t.len() + 5..]));
            }
        }
        read.retain(|f| !f.is_empty() && !f.starts_with('_'));
        read
    }

    /// A table constructor of lib.lua reads the fetched values in the
    /// list's order: its `name = ... v[i]` entries, in order, are the list.
    fn constructor_order(function: &str) -> Vec<String> {
        let start = LIB
            .find(&format!("local function {function}("))
            .unwrap_or_else(|| panic!("{function} in lib.lua"));
        let body = &LIB[start..];
        let ret = body.find("return { ").unwrap();
        let body = &body[ret..ret + body[ret..].find("}\n").unwrap()];
        let mut out = Vec::new();
        for (k, entry) in body["return { ".len()..].split(',').enumerate() {
            let (name, value) = entry.split_once('=').expect("name = value");
            assert!(
                value.contains(&format!("v[{}]", k + 1)),
                "{function}: `{}` reads {value}, not v[{}]",
                name.trim(),
                k + 1
            );
            out.push(name.trim().to_string());
        }
        out
    }

    /// Every field a script reads from a job table is one `job_meta`
    /// fetches: JOB_FIELDS in lib.lua is a fixed list (one HMGET), so a
    /// field read but not listed would silently be nil.
    #[test]
    fn job_meta_fetches_every_field_the_scripts_read() {
        let listed = listed("JOB_FIELDS");
        assert!(listed.len() > 20, "{listed:?}");
        assert_eq!(constructor_order("job_meta"), listed);
        let read = fields_read("J");
        for f in &read {
            assert!(
                listed.contains(&f.as_str()),
                "a script reads job field `{f}` that job_meta does not fetch"
            );
        }
        // counted(J) reads these two.
        assert!(listed.contains(&"counted") && listed.contains(&"attempts"));
    }

    /// The same for tenants: TENANT_FIELDS names every field a script reads
    /// from a tenant table, in the order `tenant_meta` builds it.
    #[test]
    fn tenant_meta_fetches_every_field_the_scripts_read() {
        let listed = listed("TENANT_FIELDS");
        assert_eq!(constructor_order("tenant_meta"), listed);
        let read = fields_read("T");
        assert!(read.len() > 10, "{read:?}");
        for f in &read {
            assert!(
                listed.contains(&f.as_str()),
                "a script reads tenant field `{f}` that tenant_meta does not fetch"
            );
        }
    }
}
