"""deploy/terraform: what can be checked without terraform (no binary or provider can be
downloaded here, so `terraform validate/plan/apply` never ran).

Every .tf file parses (python-hcl2); every variable is typed, described and used; every
`var.X` is declared; the outputs the Ansible side needs exist; the security group opens only
the documented ports; the README documents every input and output. The inventory template
is rendered by a small substitute for Terraform's templatefile() — only the constructs the
template uses: `${path}`, `${jsonencode(path)}`, `%{ for k, v in map }` / `%{ endfor }` and
`~` strip markers; anything else is refused, so the template stays simple enough for this to
be honest — and `ansible-inventory` must accept the result with the group and variables the
roles read. tests/e2e/test_ansible.py renders its podman hosts through the same function.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "deploy/terraform"
TEMPLATE = MODULE / "templates/inventory.yml.tftpl"
EXAMPLE = MODULE / "examples/basic"
ROLES = REPO / "deploy/ansible/roles"

# What the members may reach on each other (design.md, "Processes on a node"), and SSH.
MEMBER_PORTS = {"etcd_peer": 2380, "api": 7070, "metrics": 9470, "http": 8080}
SSH_PORT = 22


# -- a substitute for templatefile(), for the constructs the template uses ---------------------

_TOKEN = re.compile(r"(\$\{|%\{)(~?)\s*(.*?)\s*(~?)\}", re.S)
_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_FOR = re.compile(r"for\s+([A-Za-z_]\w*)(?:\s*,\s*([A-Za-z_]\w*))?\s+in\s+(\S+)")


def _lookup(path: str, scope: Mapping[str, Any]) -> Any:
    if not _PATH.fullmatch(path):
        raise ValueError(f"unsupported expression {path!r}")
    head, *rest = path.split(".")
    value = scope[head]
    for part in rest:
        value = value[part]
    return value


def _evaluate(expression: str, scope: Mapping[str, Any]) -> str:
    call = re.fullmatch(r"jsonencode\((.+)\)", expression)
    if call:
        # Terraform's jsonencode: compact, and it escapes <, >, & as \u003c... (still YAML).
        text = json.dumps(_lookup(call.group(1).strip(), scope), separators=(",", ":"))
        return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    value = _lookup(expression, scope)
    if isinstance(value, (dict, list)):
        raise ValueError(f"{expression!r} is not a string (templatefile would refuse it)")
    return str(value).lower() if isinstance(value, bool) else str(value)


def render_template(text: str, variables: Mapping[str, Any]) -> str:
    """Render text the way Terraform's templatefile() would, for the supported subset.

    Maps are iterated in lexical key order, as Terraform does. Raises ValueError for any
    construct outside the subset (if, nested expressions, unknown functions).
    """
    # Parse into a tree: literals, interpolations, and for blocks with their bodies.
    pieces: list[tuple[str, Any]] = []
    position = 0
    for match in _TOKEN.finditer(text):
        pieces.append(("text", text[position:match.start()]))
        kind, strip_left, body, strip_right = match.groups()
        pieces.append(("directive" if kind == "%{" else "interp", (body, strip_left, strip_right)))
        position = match.end()
    pieces.append(("text", text[position:]))

    # Strip markers: "~" trims the whitespace (newlines included) of the adjacent literal.
    for index, (kind, value) in enumerate(pieces):
        if kind == "text":
            continue
        _, strip_left, strip_right = value
        if strip_left and index > 0:
            pieces[index - 1] = ("text", pieces[index - 1][1].rstrip())
        if strip_right and index + 1 < len(pieces):
            pieces[index + 1] = ("text", pieces[index + 1][1].lstrip())

    def build(start: int) -> tuple[list[Any], int]:
        nodes: list[Any] = []
        index = start
        while index < len(pieces):
            kind, value = pieces[index]
            if kind == "directive":
                body = value[0]
                if body == "endfor":
                    return nodes, index
                loop = _FOR.fullmatch(body)
                if loop is None:
                    raise ValueError(f"unsupported directive %{{ {body} }}")
                inner, end = build(index + 1)
                if end >= len(pieces):
                    raise ValueError("%{ for } without %{ endfor }")
                nodes.append(("for", loop.groups(), inner))
                index = end + 1
                continue
            nodes.append((kind, value))
            index += 1
        return nodes, index

    tree, end = build(0)
    if end != len(pieces):
        raise ValueError("%{ endfor } without %{ for }")

    def emit(nodes: list[Any], scope: Mapping[str, Any]) -> str:
        out = []
        for node in nodes:
            if node[0] == "text":
                out.append(node[1])
            elif node[0] == "interp":
                out.append(_evaluate(node[1][0], scope))
            else:
                (first, second, collection_path), inner = node[1], node[2]
                collection = _lookup(collection_path, scope)
                if isinstance(collection, Mapping):
                    items = [(key, collection[key]) for key in sorted(collection)]
                else:
                    items = list(enumerate(collection))
                for key, value in items:
                    bound = {first: key, second: value} if second else {first: value}
                    out.append(emit(inner, {**scope, **bound}))
        return "".join(out)

    return emit(tree, variables)


def render_inventory(hosts: Mapping[str, tuple[str, str]],
                     group_vars: Mapping[str, str]) -> str:
    """The inventory outputs.tf renders: hosts maps name -> (ansible_host, address)."""
    return render_template(TEMPLATE.read_text(), {
        "group": "filch",
        "hosts": {name: {"ansible_host": target, "address": address}
                  for name, (target, address) in hosts.items()},
        "group_vars": dict(group_vars),
    })


# -- parsing the module ---------------------------------------------------------------------


def _unquote(value: Any) -> Any:
    """python-hcl2 keeps the quotes of labels and strings and adds __is_block__ markers."""
    if isinstance(value, dict):
        return {k.strip('"'): _unquote(v) for k, v in value.items()
                if k not in ("__is_block__", "__comments__")}
    if isinstance(value, list):
        return [_unquote(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return json.loads(value)  # python-hcl2 8 keeps string literals quoted
    return value


def _parse(path: Path) -> dict[str, Any]:
    hcl2 = pytest.importorskip(
        "hcl2", reason="python-hcl2 is missing: it is a dev dependency (pip install -e '.[dev]')")
    with path.open() as stream:
        parsed: dict[str, Any] = _unquote(hcl2.load(stream))
    return parsed


def _blocks(parsed: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """{label: body} for one-label blocks (variable, output)."""
    found: dict[str, Any] = {}
    for block in parsed.get(kind, []):
        found.update(block)
    return found


def _resources(parsed: Mapping[str, Any]) -> dict[tuple[str, str], Any]:
    found: dict[tuple[str, str], Any] = {}
    for block in parsed.get("resource", []):
        for kind, named in block.items():
            for name, body in named.items():
                found[(kind, name)] = body
    return found


MODULE_FILES = ("main.tf", "variables.tf", "outputs.tf", "versions.tf")


@pytest.fixture(scope="module")
def module() -> dict[str, dict[str, Any]]:
    return {name: _parse(MODULE / name) for name in MODULE_FILES}


def _module_text() -> str:
    return "\n".join((MODULE / name).read_text() for name in MODULE_FILES)


def _declared(module: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    return _blocks(module["variables.tf"], "variable")


# -- the tests -------------------------------------------------------------------------------


def test_standard_module_structure() -> None:
    for name in (*MODULE_FILES, "README.md", "templates/inventory.yml.tftpl",
                 "examples/basic/main.tf", "examples/basic/outputs.tf"):
        assert (MODULE / name).is_file(), f"deploy/terraform/{name} is missing"


def test_every_tf_file_parses() -> None:
    files = sorted(MODULE.rglob("*.tf"))
    assert len(files) >= 6
    for path in files:
        assert isinstance(_parse(path), dict), path


def test_every_variable_is_typed_and_described(module: dict[str, dict[str, Any]]) -> None:
    variables = _declared(module)
    assert variables
    for name, body in variables.items():
        assert body.get("type"), f"variable {name} has no type"
        assert len(str(body.get("description", ""))) >= 10, f"variable {name}: no description"
    for path in EXAMPLE.glob("*.tf"):
        for name, body in _blocks(_parse(path), "variable").items():
            assert body.get("type") and body.get("description"), f"{path.name}: {name}"


def test_every_variable_is_used_and_every_reference_declared(
        module: dict[str, dict[str, Any]]) -> None:
    declared = set(_declared(module))
    text = _module_text()
    used = set(re.findall(r"\bvar\.([A-Za-z_][A-Za-z0-9_]*)", text))
    assert used - declared == set(), f"var.X used but not declared: {used - declared}"
    # A variable referenced only in its own validation block is not used.
    uses_outside_variables = "\n".join((MODULE / name).read_text()
                                       for name in ("main.tf", "outputs.tf"))
    unused = {name for name in declared
              if not re.search(rf"\bvar\.{name}\b", uses_outside_variables)}
    assert unused == set(), f"declared but never used: {unused}"
    locals_used = set(re.findall(r"\blocal\.([A-Za-z_]\w*)", text))
    locals_declared = {key for block in module["main.tf"].get("locals", []) for key in block}
    assert locals_used <= locals_declared, locals_used - locals_declared


def test_versions_pin_terraform_and_the_aws_provider(module: dict[str, dict[str, Any]]) -> None:
    terraform = module["versions.tf"]["terraform"][0]
    assert terraform["required_version"].startswith(">=")
    aws = terraform["required_providers"][0]["aws"]
    assert aws["source"] == "hashicorp/aws"
    assert re.search(r">=\s*\d", aws["version"]) and "<" in aws["version"]


def test_outputs_include_ips_and_the_inventory(module: dict[str, dict[str, Any]]) -> None:
    outputs = _blocks(module["outputs.tf"], "output")
    for name in ("public_ips", "private_ips", "node_names", "ansible_inventory"):
        assert name in outputs, f"output {name} is missing"
        assert outputs[name].get("description"), f"output {name} has no description"
    inventory = outputs["ansible_inventory"]["value"]
    assert "templatefile(" in inventory and "templates/inventory.yml.tftpl" in inventory
    for key in ("group", "hosts", "group_vars", "ansible_host", "address"):
        assert key in inventory, f"the template is not given {key}"


def test_instances_run_debian_12_from_its_official_account(
        module: dict[str, dict[str, Any]]) -> None:
    main = module["main.tf"]
    amis = [body["debian"] for block in main["data"] for kind, body in block.items()
            if kind == "aws_ami"]
    assert len(amis) == 1
    variables = _declared(module)
    assert variables["ami_owner"]["default"] == "136693071363"  # Debian's AWS account
    assert variables["ami_name_pattern"]["default"].startswith("debian-12-")
    resources = _resources(main)
    instance = resources[("aws_instance", "node")]
    assert instance["count"] == "${var.node_count}"
    assert instance["ami"] == "${data.aws_ami.debian.id}"
    assert ("aws_key_pair", "this") in resources
    for kind in ("aws_vpc", "aws_subnet", "aws_internet_gateway", "aws_route_table",
                 "aws_route", "aws_route_table_association", "aws_security_group"):
        assert any(key[0] == kind for key in resources), f"no {kind}"


def test_security_group_opens_only_the_documented_ports(
        module: dict[str, dict[str, Any]]) -> None:
    main = module["main.tf"]
    resources = _resources(main)
    # Rules only as separate resources of the new kind: no inline ingress, no old-style rules.
    group = resources[("aws_security_group", "node")]
    assert "ingress" not in group and "egress" not in group
    assert not [key for key in resources if key[0] == "aws_security_group_rule"]
    ingress = {name: body for (kind, name), body in resources.items()
               if kind == "aws_vpc_security_group_ingress_rule"}
    assert set(ingress) == {"member", "ssh"}

    ports = main["locals"][0]["member_ports"]
    assert ports == MEMBER_PORTS
    member = ingress["member"]
    assert member["for_each"] == "${local.member_ports}"
    assert member["from_port"] == member["to_port"] == "${each.value}"
    assert member["ip_protocol"] == "tcp"
    # Only from the group itself, never from an address range.
    assert member["referenced_security_group_id"] == "${aws_security_group.node.id}"
    assert "cidr_ipv4" not in member and "cidr_ipv6" not in member

    ssh = ingress["ssh"]
    assert ssh["from_port"] == ssh["to_port"] == SSH_PORT
    assert ssh["ip_protocol"] == "tcp"
    assert ssh["cidr_ipv4"] == "${each.value}"
    assert ssh["for_each"] == "${toset(var.ssh_cidr_blocks)}"
    assert "default" not in _declared(module)["ssh_cidr_blocks"], \
        "SSH must not default to open: the operator names where Ansible runs from"


# Where the Ansible roles make each opened port listen, beyond loopback: (role variable,
# the file that binds it, the bind spelled as in that file).
LISTENERS = {
    "etcd_peer": ("filch_node_peer_port", "tasks/cluster.yml",
                  "://{{ filch_node_address }}:{{ filch_node_peer_port }}"),
    "api": ("filch_node_api_port", "templates/filch.toml.j2",
            'listen = "0.0.0.0:{{ filch_node_api_port }}"'),
    "metrics": ("filch_node_metrics_port", "templates/filch.toml.j2",
                'metrics_listen = "{{ filch_node_address }}:{{ filch_node_metrics_port }}"'),
    "http": ("filch_node_http_port", "templates/supervisor-http-program.conf.j2",
             'FILCH_HTTP_LISTEN="0.0.0.0:{{ filch_node_http_port }}"'),
}


def test_every_opened_port_has_something_listening_on_it() -> None:
    """Terraform opens a port only if the Ansible roles deploy something that listens there
    on a member's address; etcd's client port (2379) stays on loopback, so stays closed."""
    import yaml

    role = ROLES / "filch_node"
    defaults = yaml.safe_load((role / "defaults/main.yml").read_text())
    assert set(LISTENERS) == set(MEMBER_PORTS)
    for name, (variable, path, bind) in LISTENERS.items():
        assert defaults[variable] == MEMBER_PORTS[name], name
        assert bind in (role / path).read_text(), f"{path} does not bind {name}: {bind}"
    assert defaults["filch_node_http"] is True  # the HTTP face is deployed by default
    assert "://127.0.0.1:" in defaults["filch_node_etcd_client_url"]  # loopback, TLS or not
    assert 2379 not in MEMBER_PORTS.values()


def test_example_passes_only_declared_inputs_and_every_required_one(
        module: dict[str, dict[str, Any]]) -> None:
    example = _parse(EXAMPLE / "main.tf")
    calls = _blocks(example, "module")
    assert set(calls) == {"filch"}
    arguments = set(calls["filch"]) - {"source"}
    variables = _declared(module)
    assert arguments <= set(variables), arguments - set(variables)
    required = {name for name, body in variables.items() if "default" not in body}
    assert required <= arguments, f"the example misses required inputs {required - arguments}"
    outputs = _blocks(_parse(EXAMPLE / "outputs.tf"), "output")
    assert "ansible_inventory" in outputs


def test_readme_documents_every_input_and_output(module: dict[str, dict[str, Any]]) -> None:
    readme = (MODULE / "README.md").read_text()
    rows = set(re.findall(r"^\|\s*`([a-z_0-9]+)`\s*\|", readme, re.M))
    for name in _declared(module):
        assert name in rows, f"README.md's inputs table lacks {name}"
    for name in _blocks(module["outputs.tf"], "output"):
        assert name in rows, f"README.md's outputs table lacks {name}"
    assert "terraform apply" in readme and "not" in readme.lower()
    for port in (*MEMBER_PORTS.values(), SSH_PORT):
        assert str(port) in readme


# -- the inventory template -------------------------------------------------------------------

HOSTS = {"filch-1": ("203.0.113.10", "10.42.1.10"), "filch-2": ("203.0.113.11", "10.42.1.11"),
         "filch-10": ("203.0.113.12", "10.42.1.12")}


def test_renderer_refuses_what_it_does_not_implement() -> None:
    with pytest.raises(ValueError):
        render_template("%{ if x }y%{ endif }", {"x": True})
    with pytest.raises(ValueError):
        render_template("${upper(x)}", {"x": "a"})
    with pytest.raises(ValueError):
        render_template("%{ for a in b }", {"b": []})
    assert render_template("a\n%{~ for k, v in m }\n${k}=${v}\n%{~ endfor }\nz",
                           {"m": {"b": 2, "a": 1}}) == "a\na=1\nb=2\nz"


def test_inventory_template_renders_what_the_roles_expect(tmp_path: Path) -> None:
    import yaml

    text = render_inventory(HOSTS, {"ansible_user": "admin", "filch_node_cpus": "2"})
    data = yaml.safe_load(text)
    group = data["all"]["children"]["filch"]
    assert list(group["hosts"]) == sorted(HOSTS)  # Terraform iterates maps in key order
    for name, (target, address) in HOSTS.items():
        assert group["hosts"][name] == {"ansible_host": target, "filch_node_address": address}
    assert group["vars"] == {"ansible_user": "admin", "filch_node_cpus": "2"}

    # Every variable the template sets per host is one the roles default (so is read).
    defaults = (ROLES / "filch_node/defaults/main.yml").read_text()
    assert re.search(r"^filch_node_address:", defaults, re.M)
    assert re.search(r"^filch_node_group: filch$", defaults, re.M)

    ansible_inventory = Path(sys.executable).with_name("ansible-inventory")
    if not ansible_inventory.exists():
        ansible_inventory = Path(shutil.which("ansible-inventory") or "/nonexistent")
    if not ansible_inventory.exists():
        pytest.skip("ansible-inventory is missing: ansible is a dev dependency")
    path = tmp_path / "inventory.yml"
    path.write_text(text)
    result = subprocess.run([str(ansible_inventory), "-i", str(path), "--list"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "[WARNING]" not in result.stderr, result.stderr
    listed = json.loads(result.stdout)
    assert sorted(listed["filch"]["hosts"]) == sorted(HOSTS)
    hostvars = listed["_meta"]["hostvars"]
    assert hostvars["filch-10"]["filch_node_address"] == "10.42.1.12"
    assert hostvars["filch-1"]["ansible_host"] == "203.0.113.10"
    assert hostvars["filch-2"]["ansible_user"] == "admin"
