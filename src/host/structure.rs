//! Cheap structural checks of an upload, before any compilation.
//!
//! Compile time grows superlinearly in some shapes of code: a function with
//! thousands of locals live across deeply nested loops made Cranelift spend
//! ~50 s (and ~100 CPU-seconds) on a 360 KB upload. One linear pass of
//! `wasmparser` over the bytes measures every function and refuses shapes no
//! real compiler emits, naming the bound that was crossed; only what passes
//! is handed to the (bounded) compiler.
//!
//! The bounds sit well above what real agents need: the componentize-py
//! Python agent (18 MB, the largest we know of) has 14 core modules, 13,363
//! functions, at most 271 locals, 8,401 locals × loops and 781 levels of
//! nesting in one function, and bodies up to 427 KB. A Rust agent is far
//! smaller still.

use super::config::AdmissionError;
use wasmtime::wasmparser::{Operator, Parser, Payload};

/// Function bodies in one component, all core modules together.
pub(crate) const MAX_FUNCTIONS: u64 = 100_000;
/// Bytes of one function body.
pub(crate) const MAX_FUNCTION_BYTES: usize = 2 << 20;
/// Locals (parameters not included) of one function.
pub(crate) const MAX_LOCALS: u64 = 5_000;
/// Locals × loops of one function: the shape that makes register allocation
/// blow up (every local may be live around every loop).
pub(crate) const MAX_LOCALS_X_LOOPS: u64 = 100_000;
/// Locals × loops summed over every function: many functions each just
/// under the bound above add up.
pub(crate) const MAX_TOTAL_LOCALS_X_LOOPS: u64 = 20_000_000;
/// Nesting of blocks, loops and ifs in one function.
pub(crate) const MAX_NESTING: u32 = 5_000;
/// Core modules in one component.
pub(crate) const MAX_MODULES: u32 = 64;

/// What one pass measured (for tests and error messages).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Shape {
    pub functions: u64,
    pub modules: u32,
    pub max_body_bytes: usize,
    pub max_locals: u64,
    pub max_locals_x_loops: u64,
    pub total_locals_x_loops: u64,
    pub max_nesting: u32,
}

/// Measures `bytes` and refuses what crosses a bound. Malformed bytes are
/// refused too (with wasmparser's message): the compiler would refuse them
/// anyway, after more work.
pub(crate) fn check(bytes: &[u8]) -> Result<Shape, AdmissionError> {
    let invalid = |m: String| AdmissionError::Invalid(m);
    let mut shape = Shape::default();
    for payload in Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|e| invalid(format!("invalid component: {e}")))?;
        match payload {
            Payload::ModuleSection { .. } => {
                shape.modules += 1;
                if shape.modules > MAX_MODULES {
                    return Err(invalid(format!(
                        "the component contains more than {MAX_MODULES} core modules"
                    )));
                }
            }
            Payload::CodeSectionEntry(body) => {
                shape.functions += 1;
                if shape.functions > MAX_FUNCTIONS {
                    return Err(invalid(format!(
                        "the component has more than {MAX_FUNCTIONS} functions"
                    )));
                }
                check_body(&body, shape.functions - 1, &mut shape).map_err(invalid)?;
            }
            _ => {}
        }
    }
    Ok(shape)
}

fn check_body(
    body: &wasmtime::wasmparser::FunctionBody<'_>,
    index: u64,
    shape: &mut Shape,
) -> Result<(), String> {
    let bad = |e: wasmtime::wasmparser::BinaryReaderError| format!("invalid component: {e}");
    let size = body.range().len();
    if size > MAX_FUNCTION_BYTES {
        return Err(format!(
            "function {index} is {size} bytes; at most {MAX_FUNCTION_BYTES} bytes per function are accepted"
        ));
    }
    shape.max_body_bytes = shape.max_body_bytes.max(size);
    let mut locals: u64 = 0;
    for entry in body.get_locals_reader().map_err(bad)? {
        let (count, _) = entry.map_err(bad)?;
        locals = locals.saturating_add(u64::from(count));
        if locals > MAX_LOCALS {
            return Err(format!(
                "function {index} declares more than {MAX_LOCALS} locals"
            ));
        }
    }
    shape.max_locals = shape.max_locals.max(locals);
    let (mut loops, mut depth, mut max_depth) = (0u64, 0u32, 0u32);
    let mut ops = body.get_operators_reader().map_err(bad)?;
    while !ops.eof() {
        match ops.read().map_err(bad)? {
            Operator::Loop { .. } => {
                loops += 1;
                depth += 1;
            }
            Operator::Block { .. } | Operator::If { .. } | Operator::TryTable { .. } => depth += 1,
            Operator::End => depth = depth.saturating_sub(1),
            _ => {}
        }
        max_depth = max_depth.max(depth);
        if max_depth > MAX_NESTING {
            return Err(format!(
                "function {index} nests blocks more than {MAX_NESTING} deep"
            ));
        }
        if locals.saturating_mul(loops) > MAX_LOCALS_X_LOOPS {
            return Err(format!(
                "function {index} has {locals} locals and at least {loops} loops; at most \
                 {MAX_LOCALS_X_LOOPS} locals × loops per function are accepted (the shape \
                 makes compilation take minutes)"
            ));
        }
    }
    shape.max_nesting = shape.max_nesting.max(max_depth);
    shape.max_locals_x_loops = shape.max_locals_x_loops.max(locals * loops);
    shape.total_locals_x_loops += locals * loops;
    if shape.total_locals_x_loops > MAX_TOTAL_LOCALS_X_LOOPS {
        return Err(format!(
            "the component's functions have more than {MAX_TOTAL_LOCALS_X_LOOPS} locals × loops \
             in all (the shape makes compilation take minutes)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Prints the shape of the component at `$SHAPE_OF` (to tune the bounds).
    #[test]
    fn shape_of_a_file() {
        if let Some(p) = std::env::var_os("SHAPE_OF") {
            let bytes = std::fs::read(p).unwrap();
            println!("{:?}", check(&bytes));
        }
    }
}
