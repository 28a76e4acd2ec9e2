"""Configuration: flags > FILCH_* environment > TOML file > defaults, and every check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from node.core.config import Config, load
from node.core.errors import InvalidArgument

GiB = 1024**3


def write_toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "filch.toml"
    path.write_text(text)
    return str(path)


def rejected(flags: dict[str, Any], environ: dict[str, str] | None = None) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        load(flags, environ={} if environ is None else environ)
    return caught.value


# -- precedence --------------------------------------------------------------------------


def test_defaults_work_without_any_configuration() -> None:
    config = load({}, environ={})
    assert config.listen == "127.0.0.1:7070"
    assert config.etcd_client_url == "http://127.0.0.1:2379"
    assert config.lease_ttl == 2
    assert config.task_uid == 65534
    assert config.embedded_etcd
    assert config.cpus > 0 and config.memory > 0


def test_flags_beat_environment_beat_file_beat_defaults(tmp_path: Path) -> None:
    config_file = write_toml(tmp_path, """
        name = "from-file"
        lease_ttl = 10
        cpus = 2
        sweep_interval = 7.5
    """)
    environ = {"FILCH_NAME": "from-env", "FILCH_LEASE_TTL": "20", "FILCH_CPUS": "3"}
    config = load({"config_file": config_file, "lease_ttl": 30}, environ=environ)
    assert config.lease_ttl == 30            # flag over env and file
    assert config.name == "from-env"         # env over file
    assert config.cpus == 3.0                # env over file
    assert config.sweep_interval == 7.5      # file over default
    assert config.cancel_grace == 5.0        # default
    assert config.config_file == config_file


def test_environment_converts_to_field_types() -> None:
    config = load({}, environ={"FILCH_LEASE_TTL": "7", "FILCH_CPUS": "1.5",
                               "FILCH_LISTEN": "127.0.0.1:9000"})
    assert config.lease_ttl == 7 and isinstance(config.lease_ttl, int)
    assert config.cpus == 1.5
    assert config.cpu_capacity_millis == 1500
    assert config.listen == "127.0.0.1:9000"


def test_unrelated_environment_variables_are_ignored() -> None:
    config = load({}, environ={"FILCH_NOT_A_FIELD": "x", "LEASE_TTL": "99", "PATH": "/bin"})
    assert config.lease_ttl == 2


def test_a_flag_given_as_none_does_not_override(tmp_path: Path) -> None:
    config = load({"lease_ttl": None}, environ={"FILCH_LEASE_TTL": "9"})
    assert config.lease_ttl == 9


def test_config_file_can_come_from_the_environment(tmp_path: Path) -> None:
    config_file = write_toml(tmp_path, 'name = "from-file"\n')
    assert load({}, environ={"FILCH_CONFIG_FILE": config_file}).name == "from-file"


def test_config_file_flag_beats_the_environment(tmp_path: Path) -> None:
    chosen = write_toml(tmp_path, 'name = "chosen"\n')
    other = tmp_path / "other.toml"
    other.write_text('name = "other"\n')
    config = load({"config_file": chosen}, environ={"FILCH_CONFIG_FILE": str(other)})
    assert config.name == "chosen"


# -- sizes -------------------------------------------------------------------------------


def test_memory_accepts_sizes_in_the_environment() -> None:
    assert load({}, environ={"FILCH_MEMORY": "4Gi"}).memory == 4 * GiB
    assert load({}, environ={"FILCH_MEMORY": "1073741824"}).memory == GiB


def test_sizes_accepted_in_the_toml_file(tmp_path: Path) -> None:
    config_file = write_toml(tmp_path, 'memory = "512Mi"\netcd_quota_bytes = "1Gi"\n')
    config = load({"config_file": config_file}, environ={})
    assert config.memory == 512 * 1024**2
    assert config.etcd_quota_bytes == GiB


def test_toml_memory_as_a_plain_integer(tmp_path: Path) -> None:
    config_file = write_toml(tmp_path, "memory = 2147483648\n")
    assert load({"config_file": config_file}, environ={}).memory == 2 * GiB


@pytest.mark.parametrize(("name", "value"), [("FILCH_MEMORY", "lots"),
                                             ("FILCH_MEMORY", "-1Gi"),
                                             ("FILCH_LEASE_TTL", "five"),
                                             ("FILCH_CPUS", "many")])
def test_malformed_environment_values_name_their_field(name: str, value: str) -> None:
    assert rejected({}, {name: value}).field == name.removeprefix("FILCH_").lower()


# -- etcd's client API: plain on loopback, or TLS with client certificates ----------------

# A node with certificates (files need not exist: validation checks combinations only).
TLS = {"tls_ca": "/pki/ca.crt", "tls_cert": "/pki/n.crt", "tls_key": "/pki/n.key",
       "api_token_file": "/pki/token", "etcd_peer_url": "https://127.0.0.1:2380"}


@pytest.mark.parametrize(("field", "url"), [
    ("etcd_client_url", "http://10.1.2.3:2379"),
    ("etcd_client_url", "http://0.0.0.0:2379"),
    ("etcd_client_url", "http://etcd.example.com:2379"),
    ("etcd_client_url", "http://localhost.example.com:2379"),
    ("etcd_endpoint", "http://192.168.1.10:2379"),
])
def test_without_tls_non_loopback_etcd_client_urls_are_rejected(field: str, url: str) -> None:
    error = rejected({field: url})
    assert error.field == field
    assert "loopback" in str(error) and "tls" in str(error)
    assert len(str(error).splitlines()) == 1


@pytest.mark.parametrize(("field", "url"), [
    ("etcd_client_url", "https://127.0.0.1:2379"),
    ("etcd_client_url", "https://10.1.2.3:2379"),
    ("etcd_endpoint", "https://127.0.0.1:2379"),
    ("etcd_endpoint", "https://etcd.example.com:2379"),
])
def test_without_tls_https_etcd_client_urls_are_rejected(field: str, url: str) -> None:
    """No certificates, no TLS client: https:// would need what the node does not have."""
    error = rejected({field: url})
    assert error.field == field
    assert "http://" in str(error)


@pytest.mark.parametrize(("field", "url"), [
    ("etcd_client_url", "http://127.0.0.1:2379"),
    ("etcd_client_url", "http://10.1.2.3:2379"),
    ("etcd_endpoint", "http://127.0.0.1:2379"),
    ("etcd_endpoint", "http://10.1.2.3:2379"),
    ("etcd_client_url", "https://0.0.0.0:2379"),
    ("etcd_client_url", "https://[::]:2379"),
    ("etcd_endpoint", "https://0.0.0.0:2379"),
])
def test_with_tls_plain_or_wildcard_etcd_client_urls_are_rejected(field: str, url: str) -> None:
    """With certificates, loopback too speaks TLS: a host-network task or another local
    user must not reach etcd in plain text."""
    error = rejected({**TLS, field: url})
    assert error.field == field
    assert "certificate" in str(error)


@pytest.mark.parametrize("url", ["https://127.0.0.1:2379", "https://10.1.2.3:2379",
                                 "https://[fd00::1]:2379", "https://node-1.example:2379"])
def test_with_tls_public_https_etcd_client_urls_are_accepted(url: str) -> None:
    assert load({**TLS, "etcd_client_url": url}, environ={}).etcd_client_url == url
    config = load({**TLS, "etcd_endpoint": url}, environ={})
    assert config.etcd_client_endpoint == url
    assert not config.embedded_etcd


def test_with_tls_the_default_etcd_client_url_is_https_on_loopback() -> None:
    assert load(TLS, environ={}).etcd_client_url == "https://127.0.0.1:2379"
    environ = {f"FILCH_{name.upper()}": value for name, value in TLS.items()}
    assert load({}, environ=environ).etcd_client_url == "https://127.0.0.1:2379"


def test_etcd_credentials_default_to_the_files_beside_the_nodes() -> None:
    """etcd trusts its own CA (the HTTP face's group may read tls_key): the files
    `filch certs` writes next to the node's, so existing flag sets keep working."""
    config = load(TLS, environ={})
    assert (config.etcd_tls_ca, config.etcd_tls_cert, config.etcd_tls_key) == \
        ("/pki/etcd-ca.crt", "/pki/n-etcd.crt", "/pki/n-etcd.key")
    explicit = load({**TLS, "etcd_tls_key": "/elsewhere/k.pem"}, environ={})
    assert explicit.etcd_tls_key == "/elsewhere/k.pem"
    assert explicit.etcd_tls_cert == "/pki/n-etcd.crt"
    assert load({}, environ={}).etcd_tls_ca == ""


def test_an_explicit_etcd_client_url_is_not_upgraded_to_https() -> None:
    """The https default fills in only what the operator left out."""
    assert rejected({}, {**{f"FILCH_{k.upper()}": v for k, v in TLS.items()},
                         "FILCH_ETCD_CLIENT_URL": "http://127.0.0.1:2379"}).field == \
        "etcd_client_url"


def test_non_loopback_etcd_client_url_from_the_environment_is_rejected() -> None:
    assert rejected({}, {"FILCH_ETCD_CLIENT_URL": "http://10.0.0.1:2379"}).field == \
        "etcd_client_url"


@pytest.mark.parametrize("url", ["http://127.0.0.1:2379", "http://127.0.0.2:32379",
                                 "http://localhost:2379", "http://[::1]:2379"])
def test_loopback_etcd_client_urls_are_accepted(url: str) -> None:
    assert load({"etcd_client_url": url}, environ={}).etcd_client_url == url
    config = load({"etcd_endpoint": url}, environ={})
    assert config.etcd_client_endpoint == url
    assert not config.embedded_etcd


def test_peer_url_may_be_public() -> None:
    assert load({"etcd_peer_url": "http://10.0.0.5:2380"}, environ={}).etcd_peer_url == \
        "http://10.0.0.5:2380"


@pytest.mark.parametrize(("field", "url"), [("etcd_client_url", "127.0.0.1:2379"),
                                            ("etcd_client_url", "http://127.0.0.1"),
                                            ("etcd_client_url", "unix:///run/etcd.sock"),
                                            ("etcd_peer_url", "http://10.0.0.5")])
def test_urls_without_scheme_or_port_are_rejected(field: str, url: str) -> None:
    assert rejected({field: url}).field == field


@pytest.mark.parametrize(("field", "url"), [("etcd_client_url", "http://127.0.0.1:99999"),
                                            ("etcd_endpoint", "http://127.0.0.1:port"),
                                            ("etcd_peer_url", "http://10.0.0.5:70000")])
def test_urls_with_an_impossible_port_are_rejected_naming_the_field(field: str, url: str) -> None:
    assert rejected({field: url}).field == field


# -- the TOML file -----------------------------------------------------------------------


def test_unknown_toml_key_is_rejected(tmp_path: Path) -> None:
    config_file = write_toml(tmp_path, 'name = "n"\nlease-ttl = 3\n')
    error = rejected({"config_file": config_file})
    assert error.field == "config_file"
    assert "lease-ttl" in str(error)


def test_malformed_toml_is_rejected(tmp_path: Path) -> None:
    config_file = write_toml(tmp_path, "name = \n")
    assert rejected({"config_file": config_file}).field == "config_file"


def test_missing_config_file_is_rejected(tmp_path: Path) -> None:
    error = rejected({"config_file": str(tmp_path / "absent.toml")})
    assert error.field == "config_file"
    assert "absent.toml" in str(error)


# -- other checks ------------------------------------------------------------------------


@pytest.mark.parametrize("cluster", ["u", "=http://127.0.0.1:2380", "u=not-a-url",
                                     "u=http://10.0.0.1", "a=http://10.0.0.1:2380,b"])
def test_bad_initial_cluster_is_rejected(cluster: str) -> None:
    assert rejected({"initial_cluster": cluster}).field == "initial_cluster"


def test_good_initial_cluster_is_accepted() -> None:
    cluster = "a=http://10.0.0.1:2380,b=http://10.0.0.2:2380"
    config = load({"initial_cluster": cluster, "name": "a"}, environ={})
    assert config.initial_cluster_or_self == cluster


def test_initial_cluster_defaults_to_this_member_alone() -> None:
    config = load({"name": "solo", "etcd_peer_url": "http://10.0.0.9:2380"}, environ={})
    assert config.initial_cluster_or_self == "solo=http://10.0.0.9:2380"


def test_initial_cluster_state_must_be_new_or_existing() -> None:
    assert load({"initial_cluster_state": "existing"}, environ={}).initial_cluster_state == \
        "existing"
    assert rejected({"initial_cluster_state": "join"}).field == "initial_cluster_state"


def test_task_uid_zero_is_rejected_from_any_source(tmp_path: Path) -> None:
    assert rejected({"task_uid": 0}).field == "task_uid"
    assert rejected({}, {"FILCH_TASK_UID": "0"}).field == "task_uid"
    config_file = write_toml(tmp_path, "task_uid = 0\n")
    assert rejected({"config_file": config_file}).field == "task_uid"


@pytest.mark.parametrize("ttl", [2, 300])
def test_lease_ttl_bounds_are_accepted(ttl: int) -> None:
    assert load({"lease_ttl": ttl}, environ={}).lease_ttl == ttl


@pytest.mark.parametrize("ttl", [0, 1, 301, -5])
def test_lease_ttl_outside_bounds_is_rejected(ttl: int) -> None:
    assert rejected({"lease_ttl": ttl}).field == "lease_ttl"


def test_a_web_session_lasts_12_hours_by_default() -> None:
    assert load({}, environ={}).session_ttl == 43200
    assert load({}, environ={"FILCH_SESSION_TTL": "60"}).session_ttl == 60


@pytest.mark.parametrize("ttl", [0, 4, 30 * 86400 + 1, -1])
def test_session_ttl_outside_bounds_is_rejected(ttl: int) -> None:
    assert rejected({"session_ttl": ttl}).field == "session_ttl"


@pytest.mark.parametrize(("heartbeat", "election"), [(50, 249), (5, 500), (50, 60000)])
def test_etcd_election_timeout_must_be_five_heartbeats_and_sane(heartbeat: int,
                                                                election: int) -> None:
    error = rejected({"etcd_heartbeat_ms": heartbeat, "etcd_election_timeout_ms": election})
    assert error.field in ("etcd_heartbeat_ms", "etcd_election_timeout_ms")


@pytest.mark.parametrize(("field", "value"), [("cpus", 0), ("cpus", 5000), ("cpus", "nan"),
                                              ("memory", 0), ("executor", "docker"),
                                              ("listen", "7070"), ("listen", "host:0"),
                                              ("advertise", "10.0.0.1:http")])
def test_other_bad_fields_are_named(field: str, value: Any) -> None:
    assert rejected({field: value}).field == field


def test_advertise_defaults_to_listen() -> None:
    config = load({"listen": "10.0.0.3:7070"}, environ={})
    assert config.advertise_address == "10.0.0.3:7070"
    assert load({"listen": "10.0.0.3:7070", "advertise": "filch-3:7070"},
                environ={}).advertise_address == "filch-3:7070"


@pytest.mark.parametrize(("settings", "address"), [
    ({"listen": "10.0.0.3:7070"}, "10.0.0.3:9470"),
    # The image and Ansible listen everywhere: metrics stay on the node's own address.
    ({"listen": "0.0.0.0:7070", "advertise": "10.0.0.3:7070"}, "10.0.0.3:9470"),
    ({"listen": "[::]:7070", "advertise": "node-3.example:7070"}, "node-3.example:9470"),
    ({"listen": "0.0.0.0:7070"}, "127.0.0.1:9470"),
    ({"listen": "0.0.0.0:7070", "metrics_listen": "0.0.0.0:9100"}, "0.0.0.0:9100"),
])
def test_metrics_bind_the_nodes_own_address_by_default(settings: dict[str, str], address: str
                                                      ) -> None:
    assert load(settings, environ={}).metrics_address == address


def test_config_is_frozen() -> None:
    config = load({}, environ={})
    with pytest.raises(AttributeError):
        config.lease_ttl = 9  # type: ignore[misc]
    assert isinstance(config, Config)


@pytest.mark.parametrize(("flags", "field"), [
    ({"max_log_bytes": 1024}, "max_log_bytes"),
    ({"max_log_bytes": -1}, "max_log_bytes"),
    ({"default_disk": 0}, "default_disk"),
    ({"default_disk": 1}, "default_disk"),
    ({"default_disk": 2**60}, "default_disk"),
])
def test_log_cap_and_default_disk_are_checked(flags: dict[str, Any], field: str) -> None:
    assert rejected(flags).field == field


def test_log_cap_and_default_disk_accept_sizes() -> None:
    config = load({}, environ={"FILCH_MAX_LOG_BYTES": "1Mi", "FILCH_DEFAULT_DISK": "2Gi"})
    assert (config.max_log_bytes, config.default_disk) == (1024**2, 2 * 1024**3)


def test_task_network_settings_default_safe_and_parse_from_every_source(tmp_path: Path) -> None:
    config = load({}, environ={})
    assert (config.task_subnet, config.allow_host_network) == ("auto", False)
    config_file = tmp_path / "filch.toml"
    config_file.write_text('allow_host_network = true\ntask_subnet = "100.64.9.0/24"\n')
    config = load({"config_file": str(config_file)}, environ={})
    assert (config.task_subnet, config.allow_host_network) == ("100.64.9.0/24", True)
    config = load({}, environ={"FILCH_ALLOW_HOST_NETWORK": "no"})
    assert config.allow_host_network is False


@pytest.mark.parametrize(("field", "value"), [
    ("task_subnet", "10.0.0.0/8"), ("task_subnet", "100.64.9.1/24"), ("task_subnet", "fd00::/64"),
    ("allow_host_network", "maybe")])
def test_bad_task_network_settings_name_their_field(field: str, value: str) -> None:
    with pytest.raises(InvalidArgument, match=field):
        load({}, environ={f"FILCH_{field.upper()}": value})


def test_task_deny_and_allow_take_repeated_flags_environment_and_toml_lists(
        tmp_path: Path) -> None:
    assert load({"task_deny": ("10.0.0.0/8", "192.168.0.0/16")},
                       environ={}).task_deny == "10.0.0.0/8,192.168.0.0/16"
    assert load({}, environ={"FILCH_TASK_ALLOW": "10.1.0.0/16,fd00::/8"}
                       ).task_allow == "10.1.0.0/16,fd00::/8"
    toml = tmp_path / "node.toml"
    toml.write_text('task_deny = ["172.16.0.0/12", "10.0.0.0/8"]\n')
    assert load({"config_file": str(toml)}, environ={}).task_deny == (
        "172.16.0.0/12,10.0.0.0/8")
    with pytest.raises(InvalidArgument, match=r"task_allow.*10\.0\.0\.1/8"):
        load({"task_allow": ("10.0.0.1/8",)}, environ={})
