//! The Lua scripts of `lua/`, each prefixed with `lua/lib.lua` and loaded
//! once. `Script::invoke_async` sends EVALSHA and reloads on NOSCRIPT (a
//! restarted or failed-over Redis has an empty script cache).

use redis::Script;
use std::sync::LazyLock;

macro_rules! script {
    ($name:ident, $file:literal) => {
        pub static $name: LazyLock<Script> = LazyLock::new(|| {
            Script::new(concat!(
                include_str!("../../lua/lib.lua"),
                "\n",
                include_str!(concat!("../../lua/", $file))
            ))
        });
    };
}

script!(SUBMIT, "submit.lua");
script!(CLAIM, "claim.lua");
script!(RENEW, "renew.lua");
script!(FINALIZE, "finalize.lua");
script!(CANCEL, "cancel.lua");
script!(PROMOTE, "promote.lua");
script!(REAP, "reap.lua");
script!(RELEASE, "release.lua");
script!(TENANT, "tenant.lua");
script!(RETAIN, "retain.lua");
script!(USAGE, "usage.lua");
