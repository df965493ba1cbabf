//! One operation's pooled connection. Behind a transaction-mode pooler
//! (`database.pooler: transaction`) each statement runs inside `BEGIN … COMMIT`:
//! tokio-postgres prepares every statement (Parse, then Bind in a second round trip) and
//! closes it afterwards, and only an open transaction keeps those three on the server
//! connection that holds the statement. `BEGIN`/`COMMIT` go by the simple protocol.
//!
//! Without a pooler, the engine's hot statements ([`OpConn::run_prepared`],
//! [`OpConn::fetch_all_prepared`]) stay prepared on their connection: diesel never caches
//! raw SQL, so each claim and confirm used to cost a Parse (and its planning), a Bind and a
//! Close — three round trips where one does.

use std::{
    ops::{Deref, DerefMut},
    time::Duration,
};

use diesel::{
    pg::Pg,
    query_builder::{AstPass, Query, QueryFragment, QueryId},
    result::QueryResult,
};
use diesel_async::{
    methods::LoadQuery, pooled_connection::deadpool::Object, AsyncPgConnection, RunQueryDsl,
    SimpleAsyncConnection,
};
use futures::future::BoxFuture;

/// See the module documentation.
pub(crate) struct OpConn {
    conn: Option<Object<AsyncPgConnection>>,
    per_statement_tx: bool,
    /// Between our `BEGIN` and its `COMMIT`/`ROLLBACK`, or left unanswered past `bound`:
    /// either way the connection must not go back to the pool.
    open: bool,
    /// Longest wait for one statement's answer (see `Store::bounded`).
    bound: Option<Duration>,
    /// The server's own bound on each statement (see `Store::with_statement_timeout`).
    statement_timeout: Option<Duration>,
}

impl OpConn {
    pub(crate) fn new(
        conn: Object<AsyncPgConnection>,
        per_statement_tx: bool,
        bound: Option<Duration>,
        statement_timeout: Option<Duration>,
    ) -> OpConn {
        OpConn {
            conn: Some(conn),
            per_statement_tx,
            open: false,
            bound,
            statement_timeout,
        }
    }

    /// What an operation bounded by `bound` came to: its answer, or (none came in time) a
    /// closed-connection error, the connection marked so that `Drop` closes it instead of
    /// pooling it.
    fn answered<T>(&mut self, answer: Option<QueryResult<T>>) -> QueryResult<T> {
        answer.unwrap_or_else(|| {
            self.open = true;
            let bound = self.bound.unwrap_or_default();
            Err(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::ClosedConnection,
                Box::new(format!(
                    "no answer within {}: connection given up",
                    humantime::format_duration(bound)
                )),
            ))
        })
    }

    fn raw(&mut self) -> &mut AsyncPgConnection {
        // Only `Drop` takes the connection out.
        self.conn
            .as_deref_mut()
            .expect("connection present until drop")
    }

    /// `BEGIN`, behind a transaction-mode pooler or with a statement timeout (then `SET
    /// LOCAL statement_timeout` in the same round trip); pair it with [`end`](Self::end).
    pub(crate) async fn begin(&mut self) -> QueryResult<()> {
        if self.statement_timeout.is_none() && !self.per_statement_tx {
            return Ok(());
        }
        let begin = crate::store::begin_sql(self.statement_timeout);
        // Marked open first: a failure or cancellation mid-way must not pool the connection.
        self.open = true;
        self.raw().batch_execute(&begin).await
    }

    /// Ends the transaction `begin` opened: `COMMIT` after success, else `ROLLBACK`.
    pub(crate) async fn end<T, E: From<diesel::result::Error>>(
        &mut self,
        result: Result<T, E>,
    ) -> Result<T, E> {
        if self.open {
            let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
            self.raw().batch_execute(end).await.map_err(E::from)?;
            self.open = false;
        }
        result
    }

    /// `query.load(conn)`, in its own transaction behind a transaction-mode pooler.
    // Boxed: an `async fn` generic over the query's lifetime makes callers' futures
    // unprovably `Send` (they must be: the Store is used from spawned tasks).
    pub(crate) fn fetch_all<'a, 'q, U, Q>(
        &'a mut self,
        query: Q,
    ) -> BoxFuture<'a, QueryResult<Vec<U>>>
    where
        Q: LoadQuery<'q, AsyncPgConnection, U> + Send + 'q,
        U: Send + 'a,
        'q: 'a,
    {
        Box::pin(async move {
            let bound = self.bound;
            let work = async {
                self.begin().await?;
                let result = query.load(self.raw()).await;
                self.end(result).await
            };
            let answer = bounded(bound, work).await;
            self.answered(answer)
        })
    }

    /// The first row `query` returns ([`fetch_all`](Self::fetch_all)); `NotFound` when none.
    pub(crate) async fn fetch_one<'q, U, Q>(&mut self, query: Q) -> QueryResult<U>
    where
        Q: LoadQuery<'q, AsyncPgConnection, U> + Send + 'q,
        U: Send,
    {
        self.fetch_all(query)
            .await?
            .into_iter()
            .next()
            .ok_or(diesel::result::Error::NotFound)
    }

    /// `query.execute(conn)`, in its own transaction behind a transaction-mode pooler.
    pub(crate) fn run<'a, Q>(&'a mut self, query: Q) -> BoxFuture<'a, QueryResult<usize>>
    where
        Q: diesel::query_builder::QueryFragment<diesel::pg::Pg>
            + diesel::query_builder::QueryId
            + Send
            + 'a,
    {
        Box::pin(async move {
            let bound = self.bound;
            let work = async {
                self.begin().await?;
                let result = query.execute(self.raw()).await;
                self.end(result).await
            };
            let answer = bounded(bound, work).await;
            self.answered(answer)
        })
    }
}

impl OpConn {
    /// [`run`](Self::run) for a statement whose text is fixed (formatted once per schema):
    /// kept prepared on this connection unless a transaction-mode pooler sits between.
    pub(crate) fn run_prepared<'a, Q>(&'a mut self, query: Q) -> BoxFuture<'a, QueryResult<usize>>
    where
        Q: QueryFragment<Pg> + QueryId + Send + 'a,
    {
        if self.per_statement_tx {
            self.run(query)
        } else {
            self.run(Prepared(query))
        }
    }

    /// [`fetch_all`](Self::fetch_all) for a statement whose text is fixed, kept prepared as
    /// [`run_prepared`](Self::run_prepared) says.
    pub(crate) fn fetch_all_prepared<'a, 'q, U, Q>(
        &'a mut self,
        query: Q,
    ) -> BoxFuture<'a, QueryResult<Vec<U>>>
    where
        Q: LoadQuery<'q, AsyncPgConnection, U> + Send + 'q,
        Prepared<Q>: LoadQuery<'q, AsyncPgConnection, U>,
        U: Send + 'a,
        'q: 'a,
    {
        if self.per_statement_tx {
            self.fetch_all(query)
        } else {
            self.fetch_all(Prepared(query))
        }
    }
}

/// `work`'s answer, or none if `bound` passed first.
async fn bounded<T>(
    bound: Option<Duration>,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    match bound {
        Some(bound) => tokio::time::timeout(bound, work).await.ok(),
        None => Some(work.await),
    }
}

/// A raw SQL statement that may stay prepared: diesel marks every `sql_query` unsafe to
/// cache, because its text could be built from values. Only statements whose text is fixed
/// per schema are wrapped (each distinct text is one cache entry per connection), and its
/// cache key is that text.
pub(crate) struct Prepared<Q>(Q);

impl<Q: QueryFragment<Pg>> QueryFragment<Pg> for Prepared<Q> {
    fn walk_ast<'b>(&'b self, pass: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        self.0.walk_ast(pass)
    }

    fn is_safe_to_cache_prepared(&self, _backend: &Pg) -> QueryResult<bool> {
        Ok(true)
    }
}

impl<Q> QueryId for Prepared<Q> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q: Query> Query for Prepared<Q> {
    type SqlType = Q::SqlType;
}

impl Deref for OpConn {
    type Target = AsyncPgConnection;

    fn deref(&self) -> &AsyncPgConnection {
        self.conn.as_deref().expect("connection present until drop")
    }
}

impl DerefMut for OpConn {
    fn deref_mut(&mut self) -> &mut AsyncPgConnection {
        self.raw()
    }
}

impl Drop for OpConn {
    fn drop(&mut self) {
        // A statement cut off between BEGIN and COMMIT (a cancelled future) would hand
        // the pool a connection inside a transaction: close that connection instead.
        if let Some(conn) = self.conn.take() {
            if self.open {
                drop(Object::take(conn));
            }
        }
    }
}
