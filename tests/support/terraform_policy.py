"""Read the Terraform in ``terraform/`` without a terraform binary.

python-hcl2 parses each ``.tf`` file into plain dicts. On top of that this
module offers:

* ``load_module(dir)``: all ``.tf`` files of a directory merged by top-level
  block type (``resource``, ``data``, ``locals``, ``variable``, ...).
* ``Resolver``: substitutes the simple ``${...}`` references the modules use
  (``var.x``, ``local.x``, ``aws_s3_bucket.this.arn``) with concrete values,
  following ``locals`` recursively, and refuses anything it cannot resolve.
* ``aws_run_policy(...)``: the module's ``data "aws_iam_policy_document"
  "run"`` rendered to the IAM JSON document AWS would receive, for a given
  bucket and run prefix.
* ``gcp_run_condition(...)`` / ``eval_gcp_condition(...)``: the GCP module's
  IAM condition rendered and evaluated (a small CEL subset: ``||`` of
  ``startsWith`` and ``==`` terms over ``resource.name`` and the
  ``objectListPrefix`` API attribute).
* ``iam_string_like(...)``: IAM ``StringLike`` matching, to check the
  ``s3:prefix`` condition that moto does not evaluate.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator, Mapping

import hcl2
from hcl2.utils import SerializationOptions

REPO_ROOT = Path(__file__).resolve().parents[2]
TERRAFORM_DIR = REPO_ROOT / "terraform"
AWS_MODULE_DIR = TERRAFORM_DIR / "modules" / "aws-checkpoint-bucket"
GCP_MODULE_DIR = TERRAFORM_DIR / "modules" / "gcp-checkpoint-bucket"

# Plain Python values: unquoted strings, no __is_block__ markers.
_OPTIONS = SerializationOptions(
    strip_string_quotes=True, explicit_blocks=False, with_comments=False
)

_INTERPOLATION = re.compile(r"\$\{([^{}]*)\}")


def tf_files(root: Path = TERRAFORM_DIR) -> list[Path]:
    return sorted(root.rglob("*.tf"))


def parse_tf(path: Path) -> dict[str, Any]:
    """Parse one .tf file (raises on syntax errors)."""
    with open(path, encoding="utf-8") as handle:
        return hcl2.load(handle, serialization_options=_OPTIONS)


def load_module(module_dir: Path) -> dict[str, list[Any]]:
    """All top-level blocks of a module directory, grouped by block type."""
    merged: dict[str, list[Any]] = {}
    for path in sorted(module_dir.glob("*.tf")):
        for block_type, entries in parse_tf(path).items():
            merged.setdefault(block_type, []).extend(entries)
    return merged


def blocks(module: Mapping[str, list[Any]], kind: str, type_: str) -> dict[str, Any]:
    """``resource``/``data`` blocks of one type, by name."""
    found: dict[str, Any] = {}
    for entry in module.get(kind, []):
        for name, body in entry.get(type_, {}).items():
            found[name] = body
    return found


def block(module: Mapping[str, list[Any]], kind: str, type_: str, name: str) -> Any:
    found = blocks(module, kind, type_)
    assert name in found, f"{kind} {type_}.{name} not found (have {sorted(found)})"
    return found[name]


def locals_of(module: Mapping[str, list[Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for entry in module.get("locals", []):
        merged.update(entry)
    return merged


def variables_of(module: Mapping[str, list[Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for entry in module.get("variable", []):
        merged.update(entry)
    return merged


def unescape(text: str) -> str:
    """Undo HCL string escapes that python-hcl2 leaves in place."""
    return text.replace('\\"', '"').replace("\\\\", "\\")


class Resolver:
    """Substitute ``${ref}`` interpolations with known values.

    ``values`` maps full references (``var.run_prefix``,
    ``aws_s3_bucket.this.arn``) to strings; ``local.x`` is looked up in the
    module's locals and resolved recursively. Any other expression (function
    calls, conditionals) raises, so a test cannot pass on an expression it
    did not understand.
    """

    def __init__(self, module: Mapping[str, list[Any]], values: Mapping[str, str]):
        self.locals = locals_of(module)
        self.values = dict(values)

    def ref(self, expression: str) -> str:
        expression = expression.strip()
        if expression in self.values:
            return self.values[expression]
        if expression.startswith("local."):
            name = expression[len("local.") :]
            if name not in self.locals:
                raise KeyError(f"unknown local {expression}")
            raw = self.locals[name]
            if not isinstance(raw, str):
                raise TypeError(f"local {expression} is not a string: {raw!r}")
            return self.string(raw)
        raise KeyError(f"cannot resolve ${{{expression}}}")

    def string(self, text: str) -> str:
        resolved = _INTERPOLATION.sub(lambda m: self.ref(m.group(1)), text)
        if "${" in resolved:
            raise ValueError(f"unresolved interpolation left in {resolved!r}")
        return unescape(resolved)

    def strings(self, items: Any) -> list[str]:
        if isinstance(items, str):
            items = [items]
        return [self.string(item) for item in items]


# --------------------------------------------------------------------- AWS


def aws_policy_statements(
    document: Mapping[str, Any], resolver: Resolver
) -> list[dict[str, Any]]:
    """Render the static ``statement`` blocks of an aws_iam_policy_document.

    ``dynamic "statement"`` blocks are skipped: the only one (KMS) is off for
    the module's defaults and is checked separately.
    """
    statements = []
    for raw in document.get("statement", []):
        unsupported = set(raw) - {
            "sid",
            "effect",
            "actions",
            "resources",
            "condition",
            "principals",
        }
        assert not unsupported, f"statement uses {unsupported}; teach the test"
        statement: dict[str, Any] = {
            "Effect": raw.get("effect", "Allow"),
            "Action": sorted(resolver.strings(raw["actions"])),
            "Resource": sorted(resolver.strings(raw["resources"])),
        }
        if "sid" in raw:
            statement["Sid"] = raw["sid"]
        for principal in raw.get("principals", []):
            statement.setdefault("Principal", {})[principal["type"]] = (
                resolver.strings(principal["identifiers"])
            )
        for condition in raw.get("condition", []):
            statement.setdefault("Condition", {}).setdefault(
                condition["test"], {}
            )[resolver.string(condition["variable"])] = resolver.strings(
                condition["values"]
            )
        statements.append(statement)
    return statements


def aws_run_policy(bucket: str, prefix: str, partition: str = "aws") -> dict[str, Any]:
    """The run policy of the AWS module for ``s3://bucket/prefix``."""
    module = load_module(AWS_MODULE_DIR)
    resolver = Resolver(
        module,
        {
            "aws_s3_bucket.this.arn": f"arn:{partition}:s3:::{bucket}",
            "aws_s3_bucket.this.id": bucket,
            "var.bucket_name": bucket,
            "var.run_prefix": prefix,
        },
    )
    document = block(module, "data", "aws_iam_policy_document", "run")
    return {
        "Version": "2012-10-17",
        "Statement": aws_policy_statements(document, resolver),
    }


def aws_bucket_policy(bucket: str, partition: str = "aws") -> dict[str, Any]:
    """The bucket policy (TLS-only) of the AWS module."""
    module = load_module(AWS_MODULE_DIR)
    resolver = Resolver(
        module,
        {
            "aws_s3_bucket.this.arn": f"arn:{partition}:s3:::{bucket}",
            "aws_s3_bucket.this.id": bucket,
        },
    )
    document = block(module, "data", "aws_iam_policy_document", "bucket")
    return {
        "Version": "2012-10-17",
        "Statement": aws_policy_statements(document, resolver),
    }


def iam_string_like(pattern: str, value: str) -> bool:
    """IAM StringLike: ``*`` matches any run of characters, ``?`` one."""
    regex = "".join(
        ".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern
    )
    return re.fullmatch(regex, value, flags=re.DOTALL) is not None


def list_prefix_allowed(policy: Mapping[str, Any], bucket_arn: str, prefix: str | None) -> bool:
    """Would an Allow statement grant s3:ListBucket for this list prefix?

    Evaluates the ``s3:prefix`` StringLike condition the way AWS does: a
    request without a prefix has no ``s3:prefix`` key and fails the
    condition.
    """
    for statement in policy["Statement"]:
        if statement["Effect"] != "Allow" or "s3:ListBucket" not in statement["Action"]:
            continue
        if bucket_arn not in statement["Resource"]:
            continue
        conditions = statement.get("Condition", {})
        ok = True
        for test, keys in conditions.items():
            for key, values in keys.items():
                assert (test, key) == ("StringLike", "s3:prefix"), (test, key)
                ok = ok and prefix is not None and any(
                    iam_string_like(pattern, prefix) for pattern in values
                )
        if ok:
            return True
    return False


def iter_actions(policy: Mapping[str, Any]) -> Iterator[str]:
    for statement in policy["Statement"]:
        yield from statement["Action"]


# --------------------------------------------------------------------- GCP


def gcp_run_condition(bucket: str, prefix: str) -> str:
    """The CEL condition of the GCP module's objectUser binding."""
    module = load_module(GCP_MODULE_DIR)
    resolver = Resolver(
        module,
        {
            "google_storage_bucket.this.name": bucket,
            "var.bucket_name": bucket,
            "var.run_prefix": prefix,
        },
    )
    conditions = locals_of(module)
    # The binding must use the local that joins the terms checked here.
    binding = block(module, "resource", "google_storage_bucket_iam_member", "training")
    assert binding["condition"][0]["expression"] == "${local.run_prefix_condition}"
    assert conditions["run_prefix_condition"] == (
        '${join(" || ", local.run_prefix_condition_terms)}'
    ), conditions["run_prefix_condition"]
    return " || ".join(resolver.strings(conditions["run_prefix_condition_terms"]))


_CEL_TERM = re.compile(
    r"""^(?P<subject>resource\.name|api\.getAttribute\("storage\.googleapis\.com/objectListPrefix",\s*""\))"""
    r"""(?:\.startsWith\("(?P<starts>[^"\\]*)"\)|\s*==\s*"(?P<equals>[^"\\]*)")$"""
)


def eval_gcp_condition(
    expression: str, resource_name: str, list_prefix: str | None = None
) -> bool:
    """Evaluate the module's CEL condition for one request.

    ``resource_name`` is the resource the permission is checked on
    (``projects/_/buckets/B`` for listing, ``.../objects/NAME`` for object
    operations); ``list_prefix`` the list request's prefix (None for other
    requests, which makes ``api.getAttribute`` return its default ``""``).
    """
    result = False
    for term in expression.split(" || "):
        match = _CEL_TERM.match(term.strip())
        assert match, f"unsupported CEL term {term!r}"
        if match.group("subject") == "resource.name":
            subject = resource_name
        else:
            subject = list_prefix if list_prefix is not None else ""
        if match.group("starts") is not None:
            value = subject.startswith(match.group("starts"))
        else:
            value = subject == match.group("equals")
        result = result or value
    return result
