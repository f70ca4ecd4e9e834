//! Waking idle workers: a blocking wait on the wake list that SUBMIT and
//! PROMOTE push to, on a dedicated connection.

use super::*;

/// The blocking wake-up connection and whether a signal it received is
/// still unconsumed (its waiter went away before reading it).
#[derive(Default)]
pub(super) struct WaitState {
    conn: Option<Conn>,
    woken: bool,
}

impl ControlPlane {
    /// Waits until work may be there (a wake-up signal on a shard's list)
    /// or `timeout` passes. A lost signal costs at most `timeout`.
    ///
    /// Cancellation-safe: the BLPOP runs in its own task that holds the
    /// wait connection, so a caller that stops waiting (a `select!` whose
    /// other branch won) neither loses a signal the server already handed
    /// over nor leaves a blocked BLPOP queued ahead of the next one on the
    /// same connection; the next call finds the signal and returns at once.
    pub async fn wait_for_work(&self, timeout: Duration) -> Result<(), CpError> {
        let mut st = self.waiter.clone().lock_owned().await;
        if std::mem::take(&mut st.woken) {
            return Ok(());
        }
        if st.conn.is_none() {
            st.conn = Some(self.target.connect_blocking(timeout).await?);
        }
        // BLPOP takes one slot's keys on a cluster: wait on one shard, picked
        // at random, and let the timeout cover the others.
        let key = self.keys.wake(rand::random::<u32>() % self.keys.shards());
        let secs = timeout.as_secs_f64().max(0.01);
        let task = tokio::spawn(async move {
            let Some(conn) = st.conn.as_mut() else {
                return Ok(());
            };
            let r: redis::RedisResult<Option<(String, String)>> = redis::cmd("BLPOP")
                .arg(key)
                .arg(secs)
                .query_async(conn)
                .await;
            match r {
                Ok(popped) => {
                    st.woken = popped.is_some();
                    Ok(())
                }
                Err(e) => {
                    st.conn = None;
                    Err(e)
                }
            }
        });
        match task.await {
            Ok(r) => {
                // This caller saw the answer: the signal is consumed.
                self.waiter.lock().await.woken = false;
                Ok(r?)
            }
            Err(e) => Err(CpError::Internal(format!("wake-up wait task: {e}"))),
        }
    }
}
