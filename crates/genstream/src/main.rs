//! `genstream`: the server and its command-line client in one binary (docs/protocol.md §8).
//!
//! - `genstream serve` runs the server;
//! - `genstream token --user NAME` mints a JWT signed with the server's secret;
//! - `genstream key create | list | revoke` manages API keys in the database;
//! - `genstream chat "text"` starts a chat and streams the answer, reconnecting with
//!   its cursor when the connection drops; `attach` follows an existing stream;
//!   `abort` stops one.
//!
//! Errors print one line on stderr and exit non-zero.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use genstream_server::config::{Config, Overrides};

/// jemalloc rather than the system allocator: under 10,000 SSE readers connecting and
/// disconnecting for 10 minutes, glibc malloc's resident memory climbed 2.6 MiB/min
/// and kept its high-water mark after every reader left, while jemalloc stayed within
/// 3% and gave freed pages back (BENCHMARKS.md, "soak on a quiet machine").
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "genstream",
    version,
    about = "Durable, resumable LLM generation jobs over SSE"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Print a JWT for a user, signed with the secret `serve` uses.
    Token {
        /// The user id (`sub`).
        #[arg(long)]
        user: String,
        /// Lifetime: seconds, or with a unit: 90s, 30m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Show a user's balance, or add credits to it (1 credit = 1e-6 USD; negative to
    /// take away).
    Balance {
        #[arg(long)]
        user: String,
        /// Credits to add.
        #[arg(long, allow_negative_numbers = true)]
        add: Option<f64>,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Manage API keys: `Authorization: Bearer gsk_…` is accepted wherever a JWT is.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Start a chat and stream the answer.
    Chat {
        /// The message.
        text: String,
        /// Continue this conversation.
        #[arg(long)]
        conversation: Option<String>,
        /// Answer this message (default: the conversation's latest).
        #[arg(long)]
        parent: Option<String>,
        /// The model (default: the server's first).
        #[arg(long)]
        model: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Follow a running or finished stream.
    Attach {
        stream_id: String,
        /// Start after this seq.
        #[arg(long)]
        cursor: Option<u64>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Abort a running generation; prints the saved partial answer.
    Abort {
        stream_id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Make a key for a user and print it. It is shown only this once: the database
    /// keeps its hash.
    Create {
        /// The user the key acts as.
        #[arg(long)]
        user: String,
        /// A label, e.g. the machine or app the key is for.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// List a user's keys: id, prefix, label, created, last used, revoked.
    List {
        #[arg(long)]
        user: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Revoke a key by its id; every replica refuses it from the next request on.
    Revoke {
        /// The key's id, as `key list` shows it.
        id: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Args)]
struct ConfigArgs {
    /// Config file (default: ./genstream.toml if present).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Database URL, overriding the config's `database`.
    #[arg(long)]
    database: Option<String>,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Address to listen on, overriding `bind`.
    #[arg(long)]
    bind: Option<String>,
    /// Job store, overriding `store`.
    #[arg(long)]
    store: Option<String>,
}

#[derive(Args)]
struct ClientArgs {
    /// Server URL.
    #[arg(
        long,
        env = "GENSTREAM_SERVER",
        default_value = "http://127.0.0.1:3080"
    )]
    server: String,
    /// Bearer token. Without one, a token for user `dev` is minted from the local
    /// config's secret (or the one the local database keeps).
    #[arg(long, env = "GENSTREAM_TOKEN")]
    token: Option<String>,
    #[command(flatten)]
    config: ConfigArgs,
}

fn load_config(
    args: &ConfigArgs,
    bind: Option<String>,
    store: Option<String>,
) -> Result<Config, String> {
    Config::load(
        args.config.as_deref(),
        &Overrides {
            bind,
            database: args.database.clone(),
            store,
        },
    )
    .map_err(|e| e.to_string())
}

async fn local_token(args: &ConfigArgs, user: &str, ttl: Duration) -> Result<String, String> {
    let config = load_config(args, None, None)?;
    let db = genstream_server::serve::open_database(&config)
        .await
        .map_err(|e| e.to_string())?;
    let (secret, _) = genstream_server::serve::resolve_secret(&config, &db)
        .await
        .map_err(|e| e.to_string())?;
    genstream_server::auth::JwtKeys::new(&secret)
        .mint(user, ttl)
        .map_err(|e| format!("could not sign a token: {e}"))
}

async fn open_db(
    args: &ConfigArgs,
) -> Result<std::sync::Arc<dyn genstream_engine::persist::Persistence>, String> {
    let config = load_config(args, None, None)?;
    genstream_server::serve::open_database(&config)
        .await
        .map_err(|e| e.to_string())
}

async fn key(command: KeyCommand) -> Result<(), String> {
    let now = genstream_engine::now_rfc3339();
    match command {
        KeyCommand::Create { user, name, config } => {
            if user.is_empty() {
                return Err("--user must not be empty".into());
            }
            let db = open_db(&config).await?;
            let made = genstream_server::auth::new_api_key(&user, name.as_deref(), &now)
                .map_err(|e| e.to_string())?;
            db.create_api_key(&made.row)
                .await
                .map_err(|e| e.to_string())?;
            println!("{}", made.key);
            eprintln!(
                "API key {} for user {user}: keep it now, it is not shown again",
                made.row.id
            );
            Ok(())
        }
        KeyCommand::List { user, config } => {
            let keys = open_db(&config)
                .await?
                .list_api_keys(&user)
                .await
                .map_err(|e| e.to_string())?;
            if keys.is_empty() {
                println!("{user} has no API keys");
                return Ok(());
            }
            let rows: Vec<[String; 6]> = keys
                .into_iter()
                .map(|k| {
                    [
                        k.id,
                        format!("{}…", k.prefix),
                        k.name.unwrap_or_default(),
                        k.created_at,
                        k.last_used_at.unwrap_or_else(|| "never".into()),
                        k.revoked_at.unwrap_or_default(),
                    ]
                })
                .collect();
            let header = ["ID", "KEY", "NAME", "CREATED", "LAST USED", "REVOKED"].map(String::from);
            let widths: Vec<usize> = (0..6)
                .map(|i| {
                    rows.iter()
                        .chain(std::iter::once(&header))
                        .map(|r| r[i].chars().count())
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            for row in std::iter::once(&header).chain(&rows) {
                let cells: Vec<String> = row
                    .iter()
                    .zip(&widths)
                    .map(|(c, w)| format!("{c:<w$}"))
                    .collect();
                println!("{}", cells.join("  ").trim_end());
            }
            Ok(())
        }
        KeyCommand::Revoke { id, config } => {
            let revoked = open_db(&config)
                .await?
                .revoke_api_key(&id, &now)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("no API key {id}"))?;
            println!(
                "revoked {id} ({}…, user {}) at {}",
                revoked.prefix,
                revoked.user_id,
                revoked.revoked_at.unwrap_or(now)
            );
            Ok(())
        }
    }
}

async fn client_for(args: &ClientArgs) -> Result<genstream_client::Client, String> {
    let token = match &args.token {
        Some(t) => t.clone(),
        None => local_token(&args.config, "dev", Duration::from_secs(3600))
            .await
            .map_err(|e| format!("no --token given and none could be minted locally: {e}"))?,
    };
    genstream_client::Client::new(&args.server, &token).map_err(|e| e.to_string())
}

async fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Serve(args) => {
            let config = load_config(&args.config, args.bind, args.store)?;
            init_logs(config.log.format);
            genstream_server::serve::run(config)
                .await
                .map_err(|e| e.to_string())
        }
        Command::Token { user, ttl, config } => {
            let ttl = genstream_server::auth::parse_ttl(&ttl)
                .ok_or_else(|| format!("invalid --ttl {ttl:?}: use seconds or 90s, 30m, 1h, 7d"))?;
            let token = local_token(&config, &user, ttl).await?;
            println!("{token}");
            Ok(())
        }
        Command::Balance { user, add, config } => {
            let config = load_config(&config, None, None)?;
            let db = genstream_server::serve::open_database(&config)
                .await
                .map_err(|e| e.to_string())?;
            let policy = config.balance_policy();
            let micro = match add {
                // A new user starts from the start balance, as on their first chat.
                Some(credits) => db
                    .add_credits(
                        &user,
                        genstream_server::config::credits_to_micro(credits),
                        policy.start_micro,
                        &genstream_engine::now_rfc3339(),
                    )
                    .await
                    .map_err(|e| e.to_string())?,
                // What `GET /api/balance` shows: settled the same way.
                None if config.balance.enabled => {
                    genstream_engine::billing::settle_balance(&*db, &policy, &user)
                        .await
                        .map_err(|e| e.to_string())?
                }
                None => db
                    .balance(&user)
                    .await
                    .map_err(|e| e.to_string())?
                    .map(|b| b.balance_micro)
                    .unwrap_or(0),
            };
            println!(
                "{user}: {} credits",
                genstream_engine::billing::credits(micro)
            );
            Ok(())
        }
        Command::Key { command } => key(command).await,
        Command::Chat {
            text,
            conversation,
            parent,
            model,
            client,
        } => {
            let c = client_for(&client).await?;
            let req = genstream_client::ChatRequest {
                text,
                conversation_id: conversation,
                parent_message_id: parent,
                model,
            };
            reported(
                genstream_client::run_chat(
                    &c,
                    &req,
                    &mut std::io::stdout(),
                    &mut std::io::stderr(),
                )
                .await,
            )
        }
        Command::Attach {
            stream_id,
            cursor,
            client,
        } => {
            let c = client_for(&client).await?;
            let mut out = std::io::stdout();
            let mut err = std::io::stderr();
            let result =
                genstream_client::run_attach(&c, &stream_id, cursor, &mut out, &mut err).await;
            reported(result)
        }
        Command::Abort { stream_id, client } => {
            let c = client_for(&client).await?;
            reported(
                genstream_client::run_abort(
                    &c,
                    &stream_id,
                    &mut std::io::stdout(),
                    &mut std::io::stderr(),
                )
                .await,
            )
        }
    }
}

/// Maps a client result to ours. Errors the client already printed (an aborted or
/// failed generation) become an empty message: exit non-zero, print nothing more.
fn reported(r: Result<(), genstream_client::ClientError>) -> Result<(), String> {
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.is_reported() => Err(String::new()),
        Err(e) => Err(e.to_string()),
    }
}

/// The server's log on stderr: level from `RUST_LOG` (default `info`), format from
/// `log.format` (text, or one JSON object per line with its spans).
fn init_logs(format: genstream_server::observe::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        genstream_server::observe::LogFormat::Text => logs.init(),
        genstream_server::observe::LogFormat::Json => logs.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("genstream: could not start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("genstream: {e}");
            }
            ExitCode::FAILURE
        }
    }
}
