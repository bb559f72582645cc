//! Connections to one Redis or to a Redis Cluster, behind one type each: [`Target`]
//! (where to connect), [`Conn`] (the multiplexed command connection) and the pub/sub
//! pair [`PubSubSink`] / [`PubSubFeed`]. The rest of the crate calls them the same way
//! in both modes; the few places where a call would cross Cluster slots ask
//! [`Conn::is_cluster`] (see the crate docs, "Redis Cluster").

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
use redis::{
    Cmd, ErrorKind, Pipeline, PushInfo, PushKind, RedisError, RedisFuture, RedisResult, Value,
};
use tokio::sync::mpsc;

/// The scheme of a Redis Cluster store URL: `redis+cluster://[user:password@]host:port,host:port,...`.
pub const CLUSTER_SCHEME: &str = "redis+cluster://";

/// Where the store connects: one Redis, or the seed nodes of a Redis Cluster.
pub(crate) enum Target {
    Single(redis::Client),
    /// `redis://[user:password@]host:port` of each seed node; the cluster connection
    /// learns the rest of the topology (and every change of it) from them.
    Cluster(Vec<String>),
}

impl Target {
    /// Parses a store URL: `redis://…` / `rediss://…` (one Redis) or
    /// `redis+cluster://[user:password@]host:port,host:port,...` (a Cluster; the
    /// credentials apply to every node).
    ///
    /// Errors: a URL redis-rs cannot read, or a cluster URL without a node.
    pub(crate) fn open(url: &str) -> RedisResult<Target> {
        let Some(rest) = url.strip_prefix(CLUSTER_SCHEME) else {
            return Ok(Target::Single(redis::Client::open(url)?));
        };
        let rest = rest.trim_end_matches('/');
        let (creds, hosts) = match rest.rfind('@') {
            Some(at) => (&rest[..=at], &rest[at + 1..]),
            None => ("", rest),
        };
        let nodes: Vec<String> = hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|h| format!("redis://{creds}{h}"))
            .collect();
        if nodes.is_empty() {
            return Err(RedisError::from((
                ErrorKind::InvalidClientConfig,
                "a redis+cluster:// URL names at least one host:port",
            )));
        }
        // Fail now on a node URL redis-rs cannot read, not at the first connect.
        redis::cluster::ClusterClient::new(nodes.clone())?;
        Ok(Target::Cluster(nodes))
    }

    fn cluster_builder(nodes: &[String], timeout: Duration) -> ClusterClientBuilder {
        // MOVED/ASK redirects and a failover's short unavailability are retried by the
        // cluster connection, within `timeout` overall.
        ClusterClientBuilder::new(nodes.to_vec())
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .retries(6)
            .min_retry_wait(20)
            .max_retry_wait(500)
    }

    /// A multiplexed command connection with `timeout` to connect and for every
    /// command: a [`ConnectionManager`] (reconnects by itself after I/O errors), or a
    /// [`ClusterConnection`] (follows the topology: redirects, failovers, new nodes).
    pub(crate) async fn command_connection(&self, timeout: Duration) -> RedisResult<Conn> {
        let timed_out = || RedisError::from((ErrorKind::Io, "connect timed out"));
        match self {
            Target::Single(client) => {
                let mgr_cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_secs(1));
                let c = tokio::time::timeout(
                    timeout,
                    client.get_connection_manager_with_config(mgr_cfg),
                )
                .await
                .map_err(|_| timed_out())??;
                Ok(Conn::Single(c))
            }
            Target::Cluster(nodes) => {
                let client = Self::cluster_builder(nodes, timeout).build()?;
                let c = tokio::time::timeout(timeout, client.get_async_connection())
                    .await
                    .map_err(|_| timed_out())??;
                Ok(Conn::Cluster(c))
            }
        }
    }

    /// A fresh pub/sub connection, not subscribed to anything yet. On a Cluster it is
    /// a RESP3 cluster connection whose pushes (messages, and a `Disconnection` when a
    /// node's connection drops) arrive on the feed; the feed ends when the sink goes.
    pub(crate) async fn pubsub(&self, timeout: Duration) -> RedisResult<(PubSubSink, PubSubFeed)> {
        let timed_out = || RedisError::from((ErrorKind::Io, "pub/sub connect timed out"));
        match self {
            Target::Single(client) => {
                let ps = tokio::time::timeout(timeout, client.get_async_pubsub())
                    .await
                    .map_err(|_| timed_out())??;
                let (sink, stream) = ps.split();
                Ok((PubSubSink::Single(sink), PubSubFeed::Single(stream)))
            }
            Target::Cluster(nodes) => {
                let (tx, rx) = mpsc::unbounded_channel();
                let client = Self::cluster_builder(nodes, timeout)
                    .use_protocol(redis::ProtocolVersion::RESP3)
                    .push_sender(tx)
                    .build()?;
                let c = tokio::time::timeout(timeout, client.get_async_connection())
                    .await
                    .map_err(|_| timed_out())??;
                let own = OwnUnsubscribes::default();
                Ok((
                    PubSubSink::Cluster(c, own.clone()),
                    PubSubFeed::Cluster(rx, own),
                ))
            }
        }
    }
}

/// The command connection: cheap to clone (every clone multiplexes on the same
/// sockets). Implements [`ConnectionLike`], so commands, pipelines and scripts run on
/// it as on either connection.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    /// True on a Redis Cluster.
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }

    /// Runs `cmd` on every primary (one Redis: on it) and returns each one's reply.
    pub(crate) async fn on_all_primaries(&mut self, cmd: &Cmd) -> RedisResult<Vec<Value>> {
        match self {
            Conn::Single(c) => Ok(vec![cmd.query_async(c).await?]),
            Conn::Cluster(c) => {
                let routing = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                match c.route_command(cmd.clone(), routing).await? {
                    Value::Map(replies) => Ok(replies.into_iter().map(|(_, v)| v).collect()),
                    other => Ok(vec![other]),
                }
            }
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// What the pub/sub feed brings.
pub(crate) enum Published {
    /// A message on `channel` (plain or sharded).
    Message { channel: String, payload: Bytes },
    /// A Cluster node's pub/sub connection dropped: the cluster connection reconnects
    /// and re-subscribes by itself, but what was published meanwhile is lost.
    NodeLost,
    /// A sharded channel is no longer subscribed: our own `SUNSUBSCRIBE`, or the node
    /// dropped it because the channel's slot moved (a failover, a resharding), which the
    /// cluster connection does not undo by itself.
    ShardUnsubscribed { channel: String },
}

/// Sharded channels this connection unsubscribed from, each with the number of its
/// `SUNSUBSCRIBE` confirmations still to come. A confirmation looks exactly like a
/// node dropping the channel after its slot moved; without this count, a mirror
/// opened again for the same job between our unsubscribe and its confirmation would
/// read as a moved slot and make the whole pub/sub connection reconnect.
type OwnUnsubscribes = Arc<parking_lot::Mutex<HashMap<String, usize>>>;

/// The receiving half of a pub/sub connection.
pub(crate) enum PubSubFeed {
    Single(redis::aio::PubSubStream),
    Cluster(mpsc::UnboundedReceiver<PushInfo>, OwnUnsubscribes),
}

impl PubSubFeed {
    /// The next message (or lost node); `None` once the connection is gone.
    pub(crate) async fn next(&mut self) -> Option<Published> {
        match self {
            PubSubFeed::Single(s) => s.next().await.map(|m| Published::Message {
                channel: m.get_channel_name().to_string(),
                payload: Bytes::copy_from_slice(m.get_payload_bytes()),
            }),
            PubSubFeed::Cluster(rx, own) => loop {
                let push = rx.recv().await?;
                match push.kind {
                    PushKind::Message | PushKind::SMessage => {
                        let mut data = push.data.into_iter();
                        if let (Some(Value::BulkString(ch)), Some(Value::BulkString(p))) =
                            (data.next(), data.next())
                        {
                            return Some(Published::Message {
                                channel: String::from_utf8_lossy(&ch).into_owned(),
                                payload: Bytes::from(p),
                            });
                        }
                    }
                    PushKind::Disconnection => return Some(Published::NodeLost),
                    PushKind::SUnsubscribe => {
                        if let Some(Value::BulkString(ch)) = push.data.into_iter().next() {
                            let channel = String::from_utf8_lossy(&ch).into_owned();
                            if take_own(own, &channel) {
                                continue;
                            }
                            return Some(Published::ShardUnsubscribed { channel });
                        }
                    }
                    // Subscription confirmations and the like.
                    _ => {}
                }
            },
        }
    }
}

/// The sending half of a pub/sub connection: subscriptions and its health `PING`.
pub(crate) enum PubSubSink {
    Single(redis::aio::PubSubSink),
    Cluster(ClusterConnection, OwnUnsubscribes),
}

impl PubSubSink {
    /// Subscribes to the abort control channel: a plain channel (on a Cluster, a
    /// `PUBLISH` reaches the subscribers on every node).
    pub(crate) async fn subscribe_control(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            PubSubSink::Single(s) => s.subscribe(channel).await,
            PubSubSink::Cluster(c, _) => c.subscribe(channel).await,
        }
    }

    /// Unsubscribes from the abort control channel (tests cut an owner off it).
    #[cfg(test)]
    pub(crate) async fn unsubscribe_control(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            PubSubSink::Single(s) => s.unsubscribe(channel).await,
            PubSubSink::Cluster(c, _) => c.unsubscribe(channel).await,
        }
    }

    /// Subscribes to jobs' frame channels, confirmed by Redis. On a Cluster these are
    /// sharded channels (`SSUBSCRIBE`), one command per channel since each lives in its
    /// job's slot, sent concurrently.
    pub(crate) async fn subscribe_jobs(&mut self, channels: &[String]) -> RedisResult<()> {
        if channels.is_empty() {
            return Ok(());
        }
        match self {
            PubSubSink::Single(s) => s.subscribe(channels).await,
            PubSubSink::Cluster(c, _) => {
                let calls = channels.iter().map(|ch| {
                    let mut c = c.clone();
                    async move { c.ssubscribe(ch).await }
                });
                futures::future::try_join_all(calls).await.map(|_| ())
            }
        }
    }

    /// Unsubscribes from jobs' frame channels (see [`Self::subscribe_jobs`]).
    pub(crate) async fn unsubscribe_jobs(&mut self, channels: &[String]) -> RedisResult<()> {
        if channels.is_empty() {
            return Ok(());
        }
        match self {
            PubSubSink::Single(s) => s.unsubscribe(channels).await,
            PubSubSink::Cluster(c, own) => {
                {
                    let mut own = own.lock();
                    for ch in channels {
                        *own.entry(ch.clone()).or_default() += 1;
                    }
                }
                let calls = channels.iter().map(|ch| {
                    let mut c = c.clone();
                    async move { c.sunsubscribe(ch).await }
                });
                futures::future::try_join_all(calls).await.map(|_| ())
            }
        }
    }

    /// A `PING` on the connection (on a Cluster: on every primary's).
    pub(crate) async fn ping(&mut self) -> RedisResult<()> {
        match self {
            PubSubSink::Single(s) => s.ping::<Value>().await.map(|_| ()),
            PubSubSink::Cluster(c, _) => {
                redis::cmd("PING").query_async::<Value>(c).await.map(|_| ())
            }
        }
    }
}

/// Counts off one of our own `SUNSUBSCRIBE` confirmations of `channel`; false if none
/// was expected (the node dropped the channel by itself).
fn take_own(own: &OwnUnsubscribes, channel: &str) -> bool {
    let mut own = own.lock();
    match own.get_mut(channel) {
        Some(n) if *n > 1 => {
            *n -= 1;
            true
        }
        Some(_) => {
            own.remove(channel);
            true
        }
        None => false,
    }
}
