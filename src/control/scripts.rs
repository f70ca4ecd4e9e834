//! The Lua scripts of `lua/`, each prefixed with `lua/lib.lua` and loaded
//! once. `Script::invoke_async` sends EVALSHA and reloads on NOSCRIPT (a
//! restarted or failed-over Redis has an empty script cache).

use redis::Script;
use std::sync::LazyLock;

const LIB: &str = include_str!("../../lua/lib.lua");

macro_rules! scripts {
    ($($name:ident => $file:literal),* $(,)?) => {
        $(
            pub static $name: LazyLock<Script> = LazyLock::new(|| {
                Script::new(concat!(
                    include_str!("../../lua/lib.lua"),
                    "\n",
                    include_str!(concat!("../../lua/", $file))
                ))
            });
        )*
        /// Every script with its file, to name the file of a failing one.
        static ALL: LazyLock<Vec<(&'static str, &'static Script)>> =
            LazyLock::new(|| vec![$(($file, &*$name)),*]);
    };
}

scripts! {
    SUBMIT => "submit.lua",
    CLAIM => "claim.lua",
    RENEW => "renew.lua",
    FINALIZE => "finalize.lua",
    CANCEL => "cancel.lua",
    PROMOTE => "promote.lua",
    REAP => "reap.lua",
    RELEASE => "release.lua",
    TENANT => "tenant.lua",
    RETAIN => "retain.lua",
    USAGE => "usage.lua",
    LOG => "log.lua",
    RETRY => "retry.lua",
    HOOKS => "hooks.lua",
}

/// Rewrites each place a Lua runtime error names, `user_script:<line>` of
/// the text sent (library, a newline, then the script), into the file and
/// line a reader opens: `lua/lib.lua:<line>` or `lua/<script>.lua:<line>`.
/// The script is found by the sha1 Redis quotes in the message. `None`
/// when the message names no place.
pub(super) fn locate(msg: &str) -> Option<String> {
    const TAG: &str = "user_script:";
    if !msg.contains(TAG) {
        return None;
    }
    // Lines before the script's first: the library's, and the joining one.
    let before = LIB.matches('\n').count() + 1;
    let file = ALL
        .iter()
        .find(|(_, s)| msg.contains(s.get_hash()))
        .map_or("<script>", |(f, _)| f);
    let mut out = String::with_capacity(msg.len() + 16);
    let mut rest = msg;
    while let Some(at) = rest.find(TAG) {
        let head = &rest[..at];
        out.push_str(head.strip_suffix('@').unwrap_or(head));
        let tail = &rest[at + TAG.len()..];
        let n = tail.chars().take_while(char::is_ascii_digit).count();
        match tail[..n].parse::<usize>() {
            Ok(line) if line > before => out.push_str(&format!("lua/{file}:{}", line - before)),
            Ok(line) => out.push_str(&format!("lua/lib.lua:{line}")),
            Err(_) => out.push_str(TAG),
        }
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
        let before = LIB.matches('\n').count() + 1;
        let msg = format!(
            "ERR user_script:{}: boom script: {}, on @user_script:{}.",
            before + 7,
            CLAIM.get_hash(),
            before + 7
        );
        assert_eq!(
            locate(&msg).unwrap(),
            format!(
                "ERR lua/claim.lua:7: boom script: {}, on lua/claim.lua:7.",
                CLAIM.get_hash()
            )
        );
        // The joined text really puts the script's first line there.
        let sent = format!("{LIB}\n{}", include_str!("../../lua/claim.lua"));
        assert_eq!(
            sent.lines().nth(before),
            include_str!("../../lua/claim.lua").lines().next()
        );
        let msg = format!("x script: {}, on @user_script:3.", RENEW.get_hash());
        assert!(locate(&msg).unwrap().ends_with("on lua/lib.lua:3."));
        assert_eq!(locate("ERR something else"), None);
    }

    /// Every field a script reads from a job table is one `job_meta`
    /// fetches: JOB_FIELDS in lib.lua is a fixed list (one HMGET), so a
    /// field read but not listed would silently be nil.
    #[test]
    fn job_meta_fetches_every_field_the_scripts_read() {
        let lib = LIB;
        let start = lib
            .find("local JOB_FIELDS = {")
            .expect("JOB_FIELDS in lib.lua");
        let end = start + lib[start..].find('}').unwrap();
        let listed: Vec<&str> = lib[start..end].split('\'').skip(1).step_by(2).collect();
        assert!(listed.len() > 20, "{listed:?}");
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
            // Code only: comments may name fields loosely.
            let code: String = src
                .lines()
                .map(|l| l.split("--").next().unwrap_or(""))
                .collect::<Vec<_>>()
                .join("\n");
            let src = code.as_str();
            for (i, _) in src.match_indices("J.") {
                let before = src[..i].chars().last();
                if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                    continue; // e.g. `xJ.` is another table
                }
                read.insert(field(&src[i + 2..]));
            }
            for (i, _) in src.match_indices("n(J, '") {
                read.insert(field(&src[i + 6..]));
            }
        }
        read.remove("");
        for f in &read {
            assert!(
                listed.contains(&f.as_str()),
                "a script reads job field `{f}` that job_meta does not fetch"
            );
        }
        // counted(J) reads these two.
        assert!(listed.contains(&"counted") && listed.contains(&"attempts"));
    }
}
