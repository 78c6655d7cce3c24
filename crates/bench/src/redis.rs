//! A minimal RESP2 client: just enough to load a script and call EVALSHA,
//! one request at a time per connection (as a typical client library does
//! without pipelining).

use std::io;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The token bucket most Redis users run: HMGET tokens+timestamp, refill,
/// consume, HSET, PEXPIRE. ARGV: capacity, refill tokens, refill interval ms,
/// now ms, cost. Returns {allowed, remaining}.
pub const TOKEN_BUCKET_LUA: &str = r#"
local capacity = tonumber(ARGV[1])
local refill = tonumber(ARGV[2])
local interval = tonumber(ARGV[3])
local now = tonumber(ARGV[4])
local cost = tonumber(ARGV[5])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or capacity
local ts = tonumber(state[2]) or now
if now > ts then
  tokens = math.min(capacity, tokens + (now - ts) * refill / interval)
  ts = now
end
local allowed = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'ts', ts)
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - tokens) * interval / refill) + 1000)
return {allowed, math.floor(tokens)}
"#;

#[derive(Debug, PartialEq)]
pub enum Reply {
    Simple(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

pub struct Conn {
    stream: BufReader<TcpStream>,
    out: Vec<u8>,
}

impl Conn {
    pub async fn connect(addr: std::net::SocketAddr) -> io::Result<Self> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(Self {
            stream: BufReader::new(s),
            out: Vec::with_capacity(256),
        })
    }

    pub async fn call(&mut self, args: &[&[u8]]) -> io::Result<Reply> {
        self.out.clear();
        self.out
            .extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in args {
            self.out
                .extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            self.out.extend_from_slice(a);
            self.out.extend_from_slice(b"\r\n");
        }
        self.stream.get_mut().write_all(&self.out).await?;
        self.read().await
    }

    async fn line(&mut self) -> io::Result<String> {
        let mut line = String::new();
        if self.stream.read_line(&mut line).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "redis closed the connection",
            ));
        }
        Ok(line.trim_end().to_owned())
    }

    fn read(
        &mut self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<Reply>> + Send + '_>> {
        Box::pin(async move {
            let line = self.line().await?;
            let bad = || {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad RESP line {line:?}"),
                )
            };
            let (kind, rest) = line.split_at(1.min(line.len()));
            match kind {
                "+" => Ok(Reply::Simple(rest.to_owned())),
                "-" => Err(io::Error::other(format!("redis error: {rest}"))),
                ":" => rest.parse().map(Reply::Int).map_err(|_| bad()),
                "$" => {
                    let n: i64 = rest.parse().map_err(|_| bad())?;
                    if n < 0 {
                        return Ok(Reply::Bulk(None));
                    }
                    let mut buf = vec![0; n as usize + 2];
                    self.stream.read_exact(&mut buf).await?;
                    buf.truncate(n as usize);
                    Ok(Reply::Bulk(Some(buf)))
                }
                "*" => {
                    let n: i64 = rest.parse().map_err(|_| bad())?;
                    let mut items = Vec::with_capacity(n.max(0) as usize);
                    for _ in 0..n.max(0) {
                        items.push(self.read().await?);
                    }
                    Ok(Reply::Array(items))
                }
                _ => Err(bad()),
            }
        })
    }
}
