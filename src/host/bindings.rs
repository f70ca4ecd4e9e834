//! Bindings of the `agent` world (`wit/agent.wit`), generated once here
//! and nothing else: the host side of its imports is in `state`.

wasmtime::component::bindgen!({
    world: "agent",
    path: "wit",
    // Search may scan a large index: it runs on the blocking pool while the
    // guest is suspended, so the host functions are async. Every import may
    // trap: a host call the guest cannot pay for (fuel, memory) stops it.
    imports: { default: async | trappable },
    exports: { default: async },
});
