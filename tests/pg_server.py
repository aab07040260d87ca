"""Real PostgreSQL for tests: a primary and streaming replicas, each its own cluster on a free 127.0.0.1 port.

Every server is a throwaway cluster under /tmp (initdb, pg_ctl), so tests may stop, crash and promote them
freely. PostgreSQL refuses to run as root: as root every server binary runs as the `postgres` user through
runuser, and the directories are handed to that user (pytest's tmp_path is 0700 root, so they live in /tmp).
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Literal
from urllib.parse import quote

import psycopg
from psycopg import sql

from tests.procs import free_port, require_part

TIMEOUT = 60  # seconds, for every server command: a wedged cluster fails the test instead of hanging it
SUPERUSER = "postgres"
SUPERUSER_PASSWORD = "postgres-test"
REPLICATION_USER = "replicator"
REPLICATION_PASSWORD = "replicator-test"

StopMode = Literal["smart", "fast", "immediate"]

# Appended to initdb's postgresql.conf, so a replica copies it with the data. No synchronous_commit=off:
# an immediate stop (a crash) must not lose what a test saw committed.
_CONF = """
listen_addresses = '127.0.0.1'
fsync = off
shared_buffers = 16MB
wal_level = replica
max_wal_senders = 10
wal_keep_size = 128MB
hot_standby = on
wal_retrieve_retry_interval = 200ms
log_line_prefix = '%m [%p] '
"""

# Passwords over TCP; trust only on the socket, which sits in the 0700 data dir of the server's own user.
_HBA = """\
local all all trust
host all all 127.0.0.1/32 scram-sha-256
host replication all 127.0.0.1/32 scram-sha-256
"""


class PostgresError(RuntimeError):
    """A server command failed; the message carries its output and the tail of the server log."""


def pg_bindir() -> Path | None:
    """The directory holding initdb and pg_ctl, or None when PostgreSQL's server is not installed."""
    for find in (_bindir_from_pg_config, _newest_debian_bindir, _bindir_from_path):
        found = find()
        if found is not None and (found / "initdb").is_file() and (found / "pg_ctl").is_file():
            return found
    return None


def require_postgres() -> None:
    """Skip the caller when PostgreSQL's server is not installed (fail under CI: `require_part`)."""
    require_part(
        pg_bindir() is not None, "no PostgreSQL server binaries (initdb, pg_ctl): apt-get install postgresql"
    )


def _bindir_from_pg_config() -> Path | None:
    # Debian's pg_config may be libpq-dev's alone, pointing at a bindir without the server: the caller checks.
    if shutil.which("pg_config") is None:
        return None
    try:
        out = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(out.stdout.strip())


def _newest_debian_bindir() -> Path | None:
    # Debian keeps server binaries off PATH, one directory per major version.
    dirs = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.parent.name.isdigit()]
    return max(dirs, key=lambda p: int(p.parent.name), default=None)


def _bindir_from_path() -> Path | None:
    # Resolve symlinks: a lone initdb linked into /usr/local/bin has no pg_basebackup beside it.
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


def _as_server_user(args: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


def _give_to_server_user(path: Path) -> None:
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _clean_env(**extra: str) -> dict[str, str]:
    # A developer's PGHOST/PGPORT/PGOPTIONS must not steer the test clusters' tools.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return {**env, **extra}


class PostgresServer:
    """One cluster: `start()` (initdb the first time), `stop()`, `replica()`, `promote()`, `close()`."""

    def __init__(
        self,
        *,
        user: str = "budrt",
        password: str = "budrt-test",
        database: str = "budrt",
        bindir: Path | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        """`tls`: a server certificate and its key; TCP connections must then use TLS (hostssl)."""
        found = bindir or pg_bindir()
        if found is None:
            raise PostgresError("no PostgreSQL server binaries (initdb, pg_ctl): apt-get install postgresql")
        self.bindir = found
        self.user, self.password, self.database = user, password, database
        self.tls = tls
        self.port = free_port()
        # The log sits beside the data dir, not in it, so pg_basebackup does not copy it into a replica.
        self._base = Path(tempfile.mkdtemp(prefix="budrt-pg-", dir="/tmp"))
        _give_to_server_user(self._base)
        self.data_dir = self._base / "data"
        self.log_path = self._base / "postgres.log"
        self._initialized = False  # the data dir holds a cluster (initdb or pg_basebackup ran)
        self._provisioned = False  # the roles and database exist
        self._started = False  # started once at least: the port is then fixed, as clients hold the url
        self._closed = False
        _LIVE.add(self)

    # -- addresses ----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """SQLAlchemy URL for the application role and database (psycopg 3 driver)."""
        return self._url(self.user, self.password)

    @property
    def admin_url(self) -> str:
        """SQLAlchemy URL for the superuser, on the same database."""
        return self._url(SUPERUSER, SUPERUSER_PASSWORD)

    def _url(self, user: str, password: str) -> str:
        auth = f"{quote(user, safe='')}:{quote(password, safe='')}"
        return f"postgresql+psycopg://{auth}@127.0.0.1:{self.port}/{quote(self.database, safe='')}"

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> PostgresServer:
        """Start the server (initdb first when new); a no-op when it already runs."""
        if self._closed:
            raise PostgresError("this server was closed")
        if not self._initialized:
            self._initdb()
        if not self.is_running():
            self._launch()
        if not self._provisioned:
            self._provision()
        return self

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server; "immediate" is a crash (recovery on the next start). A no-op when stopped."""
        if not self.is_running():
            return
        result = self._pg_ctl("stop", "-m", mode, "-w", "-t", str(TIMEOUT))
        if result.returncode != 0:
            raise self._error("pg_ctl stop", result)

    def is_running(self) -> bool:
        if not (self.data_dir / "PG_VERSION").is_file():
            return False
        return self._pg_ctl("status").returncode == 0

    def close(self) -> None:
        """Stop the server and delete its files; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        _LIVE.discard(self)
        try:
            self.stop("immediate")
        except PostgresError:
            self._kill_postmaster()
        finally:
            shutil.rmtree(self._base, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- replication --------------------------------------------------------------------------------

    def replica(self) -> PostgresServer:
        """A new, started server streaming from this one (hot standby, read-only until promoted)."""
        if not self.is_running():
            raise PostgresError("start the primary before taking a replica of it")
        replica = PostgresServer(
            user=self.user, password=self.password, database=self.database, bindir=self.bindir
        )
        try:
            replica._clone(self)
            return replica.start()
        except BaseException:
            replica.close()
            raise

    def promote(self) -> None:
        """Turn this replica into a primary that accepts writes (waits until it does)."""
        result = self._pg_ctl("promote", "-w", "-t", str(TIMEOUT))
        if result.returncode != 0:
            raise self._error("pg_ctl promote", result)

    def wait_replayed(self, replica: PostgresServer, timeout: float = 10.0) -> None:
        """Wait until `replica` has replayed everything this primary had written when called."""
        with self._admin() as conn:
            lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()
        deadline = time.monotonic() + timeout
        with replica._admin() as conn:
            while not conn.execute("SELECT pg_last_wal_replay_lsn() >= %s", lsn).fetchone()[0]:
                if time.monotonic() > deadline:
                    raise PostgresError(f"replica on port {replica.port} did not replay up to {lsn[0]}")
                time.sleep(0.02)

    # -- internals ----------------------------------------------------------------------------------

    def _initdb(self) -> None:
        pwfile = self._base / "superuser-password"
        pwfile.write_text(SUPERUSER_PASSWORD + "\n")
        _give_to_server_user(pwfile)
        args = ["-D", str(self.data_dir), "-U", SUPERUSER, f"--pwfile={pwfile}", "--auth-local=trust"]
        # C locale: a CI box's LANG may name a locale that was never generated, and initdb refuses those.
        args += ["--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-sync"]
        try:
            result = self._run(["initdb", *args])
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise self._error("initdb", result)
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(_CONF)
            if self.tls is not None:
                conf.write("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")
        hba = _HBA
        if self.tls is not None:
            for name, source in zip(("server.crt", "server.key"), self.tls, strict=True):
                target = self.data_dir / name
                shutil.copyfile(source, target)
                target.chmod(0o600)  # PostgreSQL refuses a key others can read
                _give_to_server_user(target)
            hba = hba.replace("\nhost ", "\nhostssl ")  # TCP only over TLS
        (self.data_dir / "pg_hba.conf").write_text(hba)
        self._initialized = True

    def _launch(self) -> None:
        """pg_ctl start; on a first start, a port taken since free_port() chose it gets another one."""
        for _ in range(3):
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            result = self._pg_ctl(
                "start", "-w", "-t", str(TIMEOUT), "-l", str(self.log_path), "-o", self._options()
            )
            if result.returncode == 0:
                self._started = True
                return
            self._kill_postmaster()  # pg_ctl may have given up on a postmaster still coming up
            if self._started or "could not bind" not in self._log()[offset:]:
                raise self._error("pg_ctl start", result)
            self.port = free_port()
        raise self._error("pg_ctl start (port always taken)", result)

    def _options(self) -> str:
        # The port and socket dir go on the command line, not in postgresql.conf, as a replica copies that.
        return f"-p {self.port} -k {self.data_dir}"

    def _provision(self) -> None:
        with self._admin() as conn:
            role = sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}")
            conn.execute(role.format(sql.Identifier(self.user), sql.Literal(self.password)))
            database = sql.SQL("CREATE DATABASE {} OWNER {}")
            conn.execute(database.format(sql.Identifier(self.database), sql.Identifier(self.user)))
            replicator = sql.SQL("CREATE ROLE {} LOGIN REPLICATION PASSWORD {}")
            conn.execute(
                replicator.format(sql.Identifier(REPLICATION_USER), sql.Literal(REPLICATION_PASSWORD))
            )
        self._provisioned = True

    def _clone(self, primary: PostgresServer) -> None:
        self.data_dir.mkdir(mode=0o700)
        _give_to_server_user(self.data_dir)
        args = ["pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port), "-U", REPLICATION_USER]
        # -c fast: an immediate checkpoint, else the backup waits for a spread one. -R writes standby.signal
        # and a primary_conninfo that carries the password from PGPASSWORD.
        args += ["-D", str(self.data_dir), "-R", "-X", "stream", "-c", "fast", "--no-sync", "--no-password"]
        result = self._run(args, env=_clean_env(PGPASSWORD=REPLICATION_PASSWORD))
        if result.returncode != 0:
            raise self._error("pg_basebackup", result)
        self._initialized = self._provisioned = True

    def _admin(self) -> psycopg.Connection:
        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=SUPERUSER,
            password=SUPERUSER_PASSWORD,
            dbname="postgres",
            autocommit=True,
            connect_timeout=10,
        )

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self._run(["pg_ctl", "-D", str(self.data_dir), *args])

    def _run(self, args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        cmd = _as_server_user([str(self.bindir / args[0]), *args[1:]])
        try:
            # cwd /tmp: the server user may not be allowed into the caller's directory.
            return subprocess.run(
                cmd, capture_output=True, text=True, timeout=TIMEOUT + 30, env=env or _clean_env(), cwd="/tmp"
            )
        except subprocess.TimeoutExpired as e:
            raise PostgresError(f"{args[0]} timed out after {e.timeout} s\n{self._log_tail()}") from e

    def _kill_postmaster(self) -> None:
        # Last resort when pg_ctl cannot stop it: the backends exit by themselves once the postmaster dies.
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass

    def _log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _log_tail(self, lines: int = 40) -> str:
        return "server log (tail):\n" + "\n".join(self._log().splitlines()[-lines:])

    def _error(self, what: str, result: subprocess.CompletedProcess[str]) -> PostgresError:
        output = (result.stdout + result.stderr).strip()
        head = f"{what} failed (exit {result.returncode}) on port {self.port}"
        return PostgresError(f"{head}:\n{output}\n{self._log_tail()}")


# Servers a test forgot to close: stopped at exit, so no postgres outlives the test run.
_LIVE: set[PostgresServer] = set()


@atexit.register
def _close_leftovers() -> None:
    for server in list(_LIVE):
        server.close()
