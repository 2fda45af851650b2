"""Bus security: CURVE keys per role, a fail-closed ZAP handler, and who may do what.

On by default (setting ``security``, ``PHANTOM_SECURITY``: ``on`` or ``off``).
The keys live in ``curve_dir`` (``PHANTOM_CURVE_DIR``), else in ``DATA/keys``,
a directory made by ``phantom keygen`` (``make up`` makes ``var/keys`` on its
first start). One module per idea, every public name re-exported here:

* :mod:`.names`: roles, principals and the ZAP User-Id ``"<role>:<name>"``;
* :mod:`.keys`: the key directory's layout, key files, ``phantom keygen``;
* :mod:`.keystore`: the authorized public keys;
* :mod:`.policy`: the role sets of operations, :func:`authorise`, :func:`speaks_for`;
* :mod:`.zap`: the ZAP domains and the handler;
* :mod:`.locate`: where a process finds the key directory;
* :mod:`.process`: one process's :class:`Security` (:func:`setup`, :func:`current`);
* :mod:`.diagnose`: why a connection to the broker does not work.

Three checks, from coarse to fine:

1. *Connection* (:class:`ZapHandler`): only authorized keys of the roles a
   server socket's ZAP domain admits get through, fail closed.
2. *Message*: membership takes heartbeats and discovery beacons only from the
   agent key of the node they name (:func:`speaks_for`); the broker takes a
   worker's registration only for the service its key is named after.
3. *Operation*: the broker hands each request's User-Id to the worker, and the
   service base checks it against the rule the service declared for that
   operation (:func:`authorise`) before any handler runs.
"""

from __future__ import annotations

from phantom_bus.security.diagnose import diagnose
from phantom_bus.security.keys import (
    AUTHORIZED,
    DEFAULT_CLIENTS,
    DEFAULT_OPERATORS,
    DEFAULT_SERVICES,
    KeyPair,
    keygen,
    load_keypair,
    public_path,
    read_key_file,
    secret_path,
)
from phantom_bus.security.keystore import KeyStore
from phantom_bus.security.locate import KEYS_DIR, checkout_keys, resolve_directory
from phantom_bus.security.names import ROLES, Principal, SecurityError, check_name, parse_user_id
from phantom_bus.security.policy import ADMIN, CALLERS, DEFAULT_RULE, READ, USE, Rule, authorise, speaks_for
from phantom_bus.security.process import BROKER, DISCOVERY, MEMBERSHIP, Security, current, reset, setup
from phantom_bus.security.zap import (
    DOMAIN_BACKEND,
    DOMAIN_BEACON,
    DOMAIN_EVENTS_IN,
    DOMAIN_EVENTS_OUT,
    DOMAIN_FRONTEND,
    DOMAIN_HEARTBEAT,
    DOMAIN_ROLES,
    RESCAN,
    ZapHandler,
)

__all__ = [
    "ADMIN", "AUTHORIZED", "BROKER", "CALLERS", "DEFAULT_CLIENTS", "DEFAULT_OPERATORS", "DEFAULT_RULE",
    "DEFAULT_SERVICES", "DISCOVERY", "DOMAIN_BACKEND", "DOMAIN_BEACON", "DOMAIN_EVENTS_IN", "DOMAIN_EVENTS_OUT",
    "DOMAIN_FRONTEND", "DOMAIN_HEARTBEAT", "DOMAIN_ROLES", "KEYS_DIR", "MEMBERSHIP", "READ", "RESCAN", "ROLES",
    "USE", "KeyPair", "KeyStore", "Principal", "Rule", "Security", "SecurityError", "ZapHandler", "authorise",
    "check_name", "checkout_keys", "current", "diagnose", "keygen", "load_keypair", "parse_user_id", "public_path",
    "read_key_file", "reset", "resolve_directory", "secret_path", "setup", "speaks_for",
]  # fmt: skip
