//! The one thread that drives a loaded model, shared fairly by tenants.
//!
//! Calls from every instance on the node queue here, per tenant. The driver
//! serves tenants in turn: each turn feeds one call of the next tenant for
//! at most [`TURN_TOKENS`] generated tokens times the tenant's weight (a
//! prompt goes in whole; an embedding turn is as many texts as the
//! weight), then moves on: tenants share the model by their weights, as
//! they share slots. A tenant with a hundred long
//! generations in flight therefore gets one turn in each round, like a
//! tenant with one short call: it cannot hold the model. A call whose run
//! has ended (its deadline passed, its job was cancelled) is dropped at its
//! next turn, so abandoned work stops costing the model.

use super::local::{LocalModel, Sequence};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Instant;
use tokio::sync::oneshot;

/// Tokens a call of a tenant of weight 1 may generate in one turn before
/// the next tenant's.
pub(crate) const TURN_TOKENS: usize = 8;

/// Weights above this count as this (a turn stays short).
pub(crate) const MAX_TURN_WEIGHT: u32 = 16;

/// What a call asks of the model.
pub(crate) enum Work {
    Complete {
        prompt: Vec<u32>,
        max_new: usize,
        temperature: f32,
        seed: u64,
    },
    Embed {
        texts: Vec<Vec<u32>>,
    },
}

/// What the model answered.
pub(crate) enum Done {
    /// Tokens generated, and whether the model ended the answer itself.
    Completion {
        tokens: Vec<u32>,
        stopped: bool,
    },
    Embeddings(Vec<Vec<f32>>),
}

type Reply = oneshot::Sender<anyhow::Result<Done>>;

struct Task {
    tenant: Arc<str>,
    weight: u32,
    work: Work,
    deadline: Instant,
    reply: Reply,
}

/// A handle on a model's driver thread; the thread ends when the last
/// handle is dropped.
pub(crate) struct Driver {
    tx: mpsc::Sender<Task>,
}

impl Driver {
    /// Starts the thread that drives `model`.
    pub(crate) fn start(name: &str, model: Arc<LocalModel>) -> anyhow::Result<Driver> {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("model-{name}"))
            .spawn(move || drive(&model, &rx))?;
        Ok(Driver { tx })
    }

    /// Queues `work` for `tenant`; answers when it is done. Dropping the
    /// future abandons the call: the driver drops it at its next turn.
    pub(crate) async fn call(
        &self,
        tenant: Arc<str>,
        weight: u32,
        work: Work,
        deadline: Instant,
    ) -> anyhow::Result<Done> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Task {
                tenant,
                weight: weight.clamp(1, MAX_TURN_WEIGHT),
                work,
                deadline,
                reply,
            })
            .map_err(|_| anyhow::anyhow!("the model's driver has stopped"))?;
        answer
            .await
            .map_err(|_| anyhow::anyhow!("the model's driver dropped the call"))?
    }
}

/// A call in progress.
enum Active {
    Complete(Box<Sequence>),
    Embed {
        texts: VecDeque<Vec<u32>>,
        done: Vec<Vec<f32>>,
    },
}

struct InFlight {
    active: Active,
    /// Generated tokens (or texts embedded) per turn, in weight-1 turns.
    per_turn: usize,
    deadline: Instant,
    reply: Reply,
}

/// The calls of each tenant in arrival order, and the tenants in turn.
#[derive(Default)]
struct Queues {
    by_tenant: HashMap<Arc<str>, VecDeque<InFlight>>,
    turn: VecDeque<Arc<str>>,
}

impl Queues {
    fn push(&mut self, tenant: Arc<str>, call: InFlight) {
        let q = self.by_tenant.entry(tenant.clone()).or_default();
        if q.is_empty() {
            self.turn.push_back(tenant);
        }
        q.push_back(call);
    }
}

fn drive(model: &LocalModel, rx: &mpsc::Receiver<Task>) {
    let mut queues = Queues::default();
    loop {
        // Block only when there is nothing to do; otherwise take what
        // arrived and go on.
        if queues.turn.is_empty() {
            match rx.recv() {
                Ok(task) => start(model, &mut queues, task),
                Err(_) => return,
            }
        }
        while let Ok(task) = rx.try_recv() {
            start(model, &mut queues, task);
        }
        let Some(tenant) = queues.turn.pop_front() else {
            continue;
        };
        let Some(q) = queues.by_tenant.get_mut(&tenant) else {
            continue;
        };
        if let Some(mut call) = q.pop_front() {
            if call.reply.is_closed() || Instant::now() >= call.deadline {
                // Its run ended: nobody waits for the answer.
            } else {
                // A panic in the model code fails this call, not the
                // thread every other call of the node waits on.
                let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    turn(model, &mut call.active, call.per_turn)
                }))
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the model failed on this call")));
                match step {
                    Ok(false) => q.push_front(call),
                    Ok(true) => {
                        let _ = call.reply.send(Ok(finish(call.active)));
                    }
                    Err(e) => {
                        let _ = call.reply.send(Err(e));
                    }
                }
            }
        }
        if q.is_empty() {
            queues.by_tenant.remove(&tenant);
        } else {
            queues.turn.push_back(tenant);
        }
    }
}

fn start(model: &LocalModel, queues: &mut Queues, task: Task) {
    let active = match task.work {
        Work::Complete {
            prompt,
            max_new,
            temperature,
            seed,
        } => match model.sequence(prompt, max_new, temperature, seed) {
            Ok(s) => Active::Complete(Box::new(s)),
            Err(e) => {
                let _ = task.reply.send(Err(e));
                return;
            }
        },
        Work::Embed { texts } => Active::Embed {
            done: Vec::with_capacity(texts.len()),
            texts: texts.into(),
        },
    };
    queues.push(
        task.tenant,
        InFlight {
            active,
            per_turn: task.weight as usize,
            deadline: task.deadline,
            reply: task.reply,
        },
    );
}

/// One turn of a call, `weight` times a weight-1 tenant's; answers
/// whether it is done.
fn turn(model: &LocalModel, active: &mut Active, weight: usize) -> anyhow::Result<bool> {
    match active {
        Active::Complete(seq) => seq.advance(model, TURN_TOKENS * weight),
        Active::Embed { texts, done } => {
            for _ in 0..weight {
                let Some(t) = texts.pop_front() else { break };
                done.push(model.embed(&t)?);
            }
            Ok(texts.is_empty())
        }
    }
}

fn finish(active: Active) -> Done {
    match active {
        Active::Complete(seq) => {
            let (tokens, stopped) = seq.finish();
            Done::Completion { tokens, stopped }
        }
        Active::Embed { done, .. } => Done::Embeddings(done),
    }
}
