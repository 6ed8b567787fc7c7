"""Checks for the Terraform modules and examples in terraform/ (issue 7).

No terraform binary is available here, so this suite checks what can be
checked without one:

1. every .tf file parses (python-hcl2);
2. checkov finds no failed check, and every skip is an inline, justified
   ``#checkov:skip`` listed in EXPECTED_CHECKOV_SKIPS;
3. the AWS module's run policy, read from the HCL, lets a user holding only
   that policy do cloudckpt's S3 traffic (commit, restore, retention delete)
   under the run prefix and nothing outside it - against a moto S3 server with
   IAM enforcement on - and its s3:prefix list condition (which moto ignores)
   admits exactly the prefixes s3fs lists;
4. the security properties the issue asks for are present in the HCL;
plus the GCP IAM condition, variables/outputs/version pins, and the example
scripts (rendered and syntax-checked; the GCE shutdown script is run).

checkov lives in its own virtualenv (its bc-python-hcl2 dependency installs a
top-level ``hcl2`` package that would replace python-hcl2 here). The fixture
uses $CLOUDCKPT_CHECKOV if set, else a virtualenv per checkov version in the
user's cache (``$XDG_CACHE_HOME/cloudckpt/checkov-<version>``, ``~/.cache`` by
default, as pre-commit keeps its environments), created on first use and shared
by every clone on the machine.
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from support import terraform_policy as tfp

REPO_ROOT = tfp.REPO_ROOT
TERRAFORM_DIR = tfp.TERRAFORM_DIR
AWS_MODULE = tfp.AWS_MODULE_DIR
GCP_MODULE = tfp.GCP_MODULE_DIR
AWS_EXAMPLE = TERRAFORM_DIR / "examples" / "aws-spot-training"
GCP_EXAMPLE = TERRAFORM_DIR / "examples" / "gcp-spot-training"
TRAINER = TERRAFORM_DIR / "examples" / "trainer" / "train.py"
ROOT_MODULES = [AWS_MODULE, GCP_MODULE, AWS_EXAMPLE, GCP_EXAMPLE]

MiB = 2**20


# ===================================================================== 1. HCL


def test_terraform_tree_has_the_expected_files():
    files = {str(p.relative_to(TERRAFORM_DIR)) for p in tfp.tf_files()}
    for root in ROOT_MODULES:
        rel = root.relative_to(TERRAFORM_DIR)
        for name in ("versions.tf", "variables.tf", "main.tf", "outputs.tf"):
            assert f"{rel}/{name}" in files
    assert (TERRAFORM_DIR / "README.md").is_file()


@pytest.mark.parametrize(
    "path",
    tfp.tf_files(),
    ids=lambda p: str(p.relative_to(TERRAFORM_DIR)),
)
def test_tf_file_parses(path):
    parsed = tfp.parse_tf(path)
    assert parsed, f"{path} parsed to nothing"


@pytest.mark.parametrize("root", ROOT_MODULES, ids=lambda p: p.name)
def test_versions_are_pinned(root):
    module = tfp.load_module(root)
    (terraform,) = module["terraform"]
    required = terraform["required_version"]
    # A lower and an upper bound, e.g. ">= 1.5.0, < 2.0.0".
    assert re.search(r">=\s*1\.\d+", required), required
    assert re.search(r"<\s*2\.0", required), required

    (providers,) = terraform["required_providers"]
    assert providers, "no required_providers"
    for name, spec in providers.items():
        assert spec["source"] == f"hashicorp/{name}"
        assert re.search(r">=\s*\d+\.\d+", spec["version"]), spec
        assert re.search(r"<\s*\d+\.\d+", spec["version"]), spec


@pytest.mark.parametrize("root", ROOT_MODULES, ids=lambda p: p.name)
def test_variables_and_outputs_are_documented(root):
    module = tfp.load_module(root)
    variables = tfp.variables_of(module)
    assert variables
    for name, spec in variables.items():
        assert "type" in spec, f"variable {name} has no type"
        assert len(spec.get("description", "")) >= 20, f"variable {name}"
        for validation in spec.get("validation", []):
            assert f"var.{name}" in validation["condition"]
            assert validation["error_message"].strip()
    outputs = {}
    for entry in module.get("output", []):
        outputs.update(entry)
    assert "checkpoint_dir" in outputs
    for name, spec in outputs.items():
        assert len(spec.get("description", "")) >= 20, f"output {name}"


@pytest.mark.parametrize("root", ROOT_MODULES, ids=lambda p: p.name)
def test_readme_documents_every_variable_and_output(root):
    readme = (TERRAFORM_DIR / "README.md").read_text()
    section = readme.split(f"## {root.relative_to(TERRAFORM_DIR)}", 1)
    assert len(section) == 2, f"README has no section for {root.name}"
    body = section[1].split("\n## ", 1)[0]
    module = tfp.load_module(root)
    names = set(tfp.variables_of(module))
    for entry in module.get("output", []):
        names.update(entry)
    missing = sorted(name for name in names if f"| `{name}` |" not in body)
    assert not missing, f"README section for {root.name} lacks {missing}"


@pytest.mark.parametrize(
    "root, validated",
    [
        (AWS_MODULE, {"bucket_name", "run_prefix", "kms_key_arn", "name"}),
        (GCP_MODULE, {"project_id", "bucket_name", "run_prefix", "soft_delete_retention_days"}),
    ],
    ids=["aws", "gcp"],
)
def test_module_inputs_are_validated(root, validated):
    variables = tfp.variables_of(tfp.load_module(root))
    missing = {name for name in validated if not variables[name].get("validation")}
    assert not missing, f"no validation for {missing}"


def _run_prefix_regex(root: Path) -> re.Pattern[str]:
    (validation,) = tfp.variables_of(tfp.load_module(root))["run_prefix"]["validation"]
    match = re.search(r'regex\("(.*?)", var\.run_prefix\)', validation["condition"])
    assert match, validation["condition"]
    return re.compile(tfp.unescape(match.group(1)))


@pytest.mark.parametrize("root", [AWS_MODULE, GCP_MODULE], ids=["aws", "gcp"])
def test_run_prefix_validation_rejects_wildcards_and_slashes(root):
    # The prefix is pasted into IAM ARNs / CEL: anything that could widen the
    # grant must be rejected before it gets there.
    pattern = _run_prefix_regex(root)
    for good in ["runs/exp1", "a", "team-a/runs/2024_05.v2", "k=v/x"]:
        assert pattern.fullmatch(good), good
    for bad in ["", "/runs", "runs/", "runs//x", "runs/*", "runs?", 'a"b', "a b", "a\\b"]:
        assert not pattern.fullmatch(bad), bad


@pytest.mark.parametrize(
    "module, scheme",
    [(AWS_MODULE, "s3"), (GCP_MODULE, "gs")],
    ids=["aws", "gcp"],
)
def test_checkpoint_dir_output_is_the_bucket_url(module, scheme):
    outputs = {}
    for entry in tfp.load_module(module).get("output", []):
        outputs.update(entry)
    bucket_ref = "aws_s3_bucket.this.id" if scheme == "s3" else "google_storage_bucket.this.name"
    assert outputs["checkpoint_dir"]["value"] == f"{scheme}://${{{bucket_ref}}}/${{var.run_prefix}}"


# ============================================ 4. security properties in HCL


def test_aws_bucket_security_properties():
    module = tfp.load_module(AWS_MODULE)

    def res(type_: str) -> dict[str, Any]:
        body = tfp.block(module, "resource", type_, "this")
        assert body["bucket"] == "${aws_s3_bucket.this.id}", type_
        return body

    assert res("aws_s3_bucket_versioning")["versioning_configuration"][0]["status"] == "Enabled"

    (rule,) = res("aws_s3_bucket_server_side_encryption_configuration")["rule"]
    (default,) = rule["apply_server_side_encryption_by_default"]
    # SSE-S3 unless a KMS key is given, then SSE-KMS with that key.
    assert default["sse_algorithm"] == '${var.kms_key_arn == null ? "AES256" : "aws:kms"}'
    assert default["kms_master_key_id"] == "${var.kms_key_arn}"

    pab = res("aws_s3_bucket_public_access_block")
    for flag in ("block_public_acls", "block_public_policy", "ignore_public_acls", "restrict_public_buckets"):
        assert pab[flag] is True, flag

    ownership = res("aws_s3_bucket_ownership_controls")
    assert ownership["rule"][0]["object_ownership"] == "BucketOwnerEnforced"

    policy = res("aws_s3_bucket_policy")
    assert policy["policy"] == "${data.aws_iam_policy_document.bucket.json}"
    assert "${aws_s3_bucket_public_access_block.this}" in policy["depends_on"]

    lifecycle = res("aws_s3_bucket_lifecycle_configuration")
    rules = {r["id"]: r for r in lifecycle["rule"]}
    for r in rules.values():
        assert r["status"] == "Enabled"
        assert r["filter"] == [{}], "rules must apply to the whole bucket"
    noncurrent = [r for r in rules.values() if "noncurrent_version_expiration" in r]
    assert noncurrent and noncurrent[0]["noncurrent_version_expiration"][0]["noncurrent_days"] == (
        "${var.noncurrent_version_expiration_days}"
    )
    aborts = [r for r in rules.values() if "abort_incomplete_multipart_upload" in r]
    assert aborts and aborts[0]["abort_incomplete_multipart_upload"][0]["days_after_initiation"] == 1

    logging = res("aws_s3_bucket_logging")
    assert logging["count"] == "${var.access_log_bucket == null ? 0 : 1}"
    assert logging["target_bucket"] == "${var.access_log_bucket}"


def test_aws_bucket_policy_denies_insecure_transport():
    bucket = "ckpt-bucket"
    policy = tfp.aws_bucket_policy(bucket)
    arns = sorted([f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"])
    tls = [s for s in policy["Statement"] if "Bool" in s.get("Condition", {})]
    assert len(tls) == 1
    (statement,) = tls
    assert statement["Effect"] == "Deny"
    assert statement["Principal"] == {"*": ["*"]}
    assert statement["Action"] == ["s3:*"]
    assert statement["Resource"] == arns
    assert statement["Condition"] == {"Bool": {"aws:SecureTransport": ["false"]}}
    # Nothing in the bucket policy allows anything.
    assert all(s["Effect"] == "Deny" for s in policy["Statement"])


def test_aws_iam_role_and_instance_profile_hold_only_the_run_policy():
    module = tfp.load_module(AWS_MODULE)
    role = tfp.block(module, "resource", "aws_iam_role", "training")
    assert role["count"] == "${var.create_instance_profile ? 1 : 0}"
    assert role["assume_role_policy"] == "${data.aws_iam_policy_document.ec2_assume_role.json}"
    assert "managed_policy_arns" not in role and "inline_policy" not in role
    role_policy = tfp.block(module, "resource", "aws_iam_role_policy", "training")
    assert role_policy["policy"] == "${data.aws_iam_policy_document.run.json}"
    profile = tfp.block(module, "resource", "aws_iam_instance_profile", "training")
    assert profile["role"] == "${aws_iam_role.training[0].name}"
    # No other policy is attached anywhere in the module.
    assert not tfp.blocks(module, "resource", "aws_iam_role_policy_attachment")
    assert not tfp.blocks(module, "resource", "aws_iam_policy_attachment")

    (assume,) = tfp.block(module, "data", "aws_iam_policy_document", "ec2_assume_role")["statement"]
    assert assume["actions"] == ["sts:AssumeRole"]
    assert assume["principals"] == [{"type": "Service", "identifiers": ["ec2.amazonaws.com"]}]

    outputs = {}
    for entry in module["output"]:
        outputs.update(entry)
    assert outputs["iam_policy_json"]["value"] == "${data.aws_iam_policy_document.run.json}"
    for name in ("instance_profile_name", "instance_profile_arn", "role_arn", "iam_policy_arn"):
        assert name in outputs


def test_gcp_bucket_security_properties():
    module = tfp.load_module(GCP_MODULE)
    bucket = tfp.block(module, "resource", "google_storage_bucket", "this")
    assert bucket["uniform_bucket_level_access"] is True
    assert bucket["public_access_prevention"] == "enforced"
    assert bucket["versioning"] == [{"enabled": True}]
    (soft_delete,) = bucket["soft_delete_policy"]
    assert soft_delete["retention_duration_seconds"] == "${var.soft_delete_retention_days * 86400}"

    actions = {}
    for rule in bucket["lifecycle_rule"]:
        (action,) = rule["action"]
        (condition,) = rule["condition"]
        actions[action["type"]] = condition
    assert actions["Delete"] == {
        "with_state": "ARCHIVED",
        "days_since_noncurrent_time": "${var.noncurrent_version_delete_days}",
    }
    assert actions["AbortIncompleteMultipartUpload"] == {"age": 1}


def test_gcp_service_account_binding_is_object_user_with_prefix_condition():
    module = tfp.load_module(GCP_MODULE)
    binding = tfp.block(module, "resource", "google_storage_bucket_iam_member", "training")
    assert binding["role"] == "roles/storage.objectUser"
    assert binding["bucket"] == "${google_storage_bucket.this.name}"
    assert binding["member"] == "serviceAccount:${google_service_account.training.email}"
    assert binding["condition"][0]["title"]
    # Only this one, conditional, grant: no project-level roles.
    assert set(tfp.blocks(module, "resource", "google_storage_bucket_iam_member")) == {"training"}
    assert not tfp.blocks(module, "resource", "google_project_iam_member")
    assert not tfp.blocks(module, "resource", "google_storage_bucket_iam_binding")


@pytest.mark.parametrize(
    "resource_name, list_prefix, allowed",
    [
        # object operations: get/create/delete/multipart on the object
        ("projects/_/buckets/ckpt/objects/runs/exp1/model.ckpt-5.index", None, True),
        ("projects/_/buckets/ckpt/objects/runs/exp1/sub/dir/file", None, True),
        ("projects/_/buckets/ckpt/objects/runs/exp1/checkpoint", None, True),
        ("projects/_/buckets/ckpt/objects/runs/exp1-other/model.ckpt-5.index", None, False),
        ("projects/_/buckets/ckpt/objects/runs/exp1", None, False),
        ("projects/_/buckets/ckpt/objects/other/secret", None, False),
        ("projects/_/buckets/other-bucket/objects/runs/exp1/x", None, False),
        # listing: checked on the bucket with the request's prefix
        ("projects/_/buckets/ckpt", "runs/exp1/", True),
        ("projects/_/buckets/ckpt", "runs/exp1", True),
        ("projects/_/buckets/ckpt", "runs/exp1/model.ckpt-", True),
        ("projects/_/buckets/ckpt", "runs/exp1-other/", False),
        ("projects/_/buckets/ckpt", "runs/exp", False),
        ("projects/_/buckets/ckpt", "runs/", False),
        ("projects/_/buckets/ckpt", "", False),
        ("projects/_/buckets/ckpt", None, False),
    ],
)
def test_gcp_iam_condition_limits_access_to_the_run_prefix(resource_name, list_prefix, allowed):
    expression = tfp.gcp_run_condition("ckpt", "runs/exp1")
    assert tfp.eval_gcp_condition(expression, resource_name, list_prefix) is allowed


# ================================================= AWS run policy (static)

BUCKET = "ckpt-bucket"
PREFIX = "runs/exp1"
BUCKET_ARN = f"arn:aws:s3:::{BUCKET}"

# What s3fs needs for cloudckpt's traffic, and nothing more (see iam.tf).
EXPECTED_OBJECT_ACTIONS = {
    "s3:PutObject",  # PutObject, Create/UploadPart/CompleteMultipartUpload
    "s3:GetObject",  # GetObject, HeadObject
    "s3:DeleteObject",  # DeleteObject, DeleteObjects (per key)
    "s3:AbortMultipartUpload",
    "s3:ListMultipartUploadParts",
}


def test_aws_run_policy_grants_exactly_cloudckpt_actions():
    policy = tfp.aws_run_policy(BUCKET, PREFIX)
    by_sid = {s["Sid"]: s for s in policy["Statement"]}
    assert set(by_sid) == {"RunObjectReadWrite", "RunPrefixList", "BucketLocation"}
    assert all(s["Effect"] == "Allow" for s in policy["Statement"])
    for action in tfp.iter_actions(policy):
        assert "*" not in action and "?" not in action, action

    objects = by_sid["RunObjectReadWrite"]
    assert set(objects["Action"]) == EXPECTED_OBJECT_ACTIONS
    assert objects["Resource"] == [f"{BUCKET_ARN}/{PREFIX}/*"]
    assert "Condition" not in objects

    listing = by_sid["RunPrefixList"]
    assert listing["Action"] == ["s3:ListBucket"]
    assert listing["Resource"] == [BUCKET_ARN]
    assert listing["Condition"] == {"StringLike": {"s3:prefix": [PREFIX, f"{PREFIX}/*"]}}

    location = by_sid["BucketLocation"]
    assert location["Action"] == ["s3:GetBucketLocation"]
    assert location["Resource"] == [BUCKET_ARN]


def test_aws_run_policy_kms_statement_only_with_a_key():
    module = tfp.load_module(AWS_MODULE)
    document = tfp.block(module, "data", "aws_iam_policy_document", "run")
    (dynamic,) = document["dynamic"]
    kms = dynamic["statement"]
    assert kms["for_each"] == "${var.kms_key_arn == null ? [] : [var.kms_key_arn]}"
    (content,) = kms["content"]
    assert sorted(content["actions"]) == ["kms:Decrypt", "kms:GenerateDataKey"]
    assert content["resources"] == ["${statement.value}"]
    (condition,) = content["condition"]
    assert condition["variable"] == "kms:EncryptionContext:aws:s3:arn"
    assert condition["values"] == ["${local.bucket_arn}"]


@pytest.mark.parametrize(
    "prefix, allowed",
    [
        ("runs/exp1/", True),  # s3fs ls / find / info of a missing key
        ("runs/exp1", True),  # listing the run "directory" entry itself
        ("runs/exp1/model.ckpt-100.manifest.json/", True),
        ("runs/exp1/sub/dir/", True),
        ("runs/exp1-other/", False),  # sibling run: the missing-slash trap
        ("runs/exp1-other", False),
        ("runs/exp", False),
        ("runs/", False),
        ("runs", False),
        ("other/", False),
        ("", False),
        (None, False),  # no prefix parameter: whole bucket
    ],
)
def test_aws_list_condition_admits_only_the_run_prefix(prefix, allowed):
    # moto ignores Condition blocks, so the s3:prefix restriction is
    # evaluated here with IAM StringLike semantics.
    policy = tfp.aws_run_policy(BUCKET, PREFIX)
    assert tfp.list_prefix_allowed(policy, BUCKET_ARN, prefix) is allowed


# ======================================= 3. AWS run policy against moto IAM


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoAws:
    """A moto S3+IAM server: bucket, seeded objects and a 'trainer' user
    holding only the module's run policy. IAM enforcement is turned on once
    setup is done."""

    def __init__(self, endpoint: str):
        import boto3

        self.endpoint = endpoint
        self.boto3 = boto3
        # Before enforcement is on, any credentials do.
        setup = {"aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
        self.admin_s3 = boto3.client("s3", endpoint_url=endpoint, **setup)
        self.admin_iam = boto3.client("iam", endpoint_url=endpoint, **setup)

    def setup(self, policy: dict[str, Any]) -> None:
        s3, iam = self.admin_s3, self.admin_iam
        s3.create_bucket(Bucket=BUCKET)
        s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
        # Objects the trainer must not reach: another team's data, a sibling
        # run whose name extends this run's prefix, and a key equal to the
        # bare prefix.
        for key in ("other/secret.txt", f"{PREFIX}-other/model.ckpt-1.index", PREFIX):
            s3.put_object(Bucket=BUCKET, Key=key, Body=b"not yours")

        # With enforcement on, even the test's own inspection calls need an
        # IAM identity: an administrator user.
        iam.create_user(UserName="admin")
        iam.put_user_policy(
            UserName="admin",
            PolicyName="admin",
            PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
            ),
        )
        admin_key = iam.create_access_key(UserName="admin")["AccessKey"]
        self.admin_s3 = self.boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=admin_key["AccessKeyId"],
            aws_secret_access_key=admin_key["SecretAccessKey"],
        )

        iam.create_user(UserName="trainer")
        arn = iam.create_policy(
            PolicyName="cloudckpt-run", PolicyDocument=json.dumps(policy)
        )["Policy"]["Arn"]
        iam.attach_user_policy(UserName="trainer", PolicyArn=arn)
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        self.trainer_key = (key["AccessKeyId"], key["SecretAccessKey"])

    def set_auth(self, allowed_unauthenticated: str) -> str:
        """POST /moto-api/reset-auth: "0" enforces IAM from the next call on,
        "inf" turns enforcement off. Returns the previous setting."""
        import requests

        response = requests.post(
            f"{self.endpoint}/moto-api/reset-auth", data=allowed_unauthenticated.encode(), timeout=10
        )
        response.raise_for_status()
        return response.json()["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]

    def cleanup(self) -> None:
        """Remove what setup() created (with enforcement off). moto's backends
        are process-wide and shared with other moto servers of the test
        session, so no global reset."""
        s3 = self.boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id="setup", aws_secret_access_key="setup"
        )
        listing = s3.list_object_versions(Bucket=BUCKET)
        for version in listing.get("Versions", []) + listing.get("DeleteMarkers", []):
            s3.delete_object(Bucket=BUCKET, Key=version["Key"], VersionId=version["VersionId"])
        for upload in s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []):
            s3.abort_multipart_upload(Bucket=BUCKET, Key=upload["Key"], UploadId=upload["UploadId"])
        s3.delete_bucket(Bucket=BUCKET)
        iam = self.admin_iam
        for user in ("trainer", "admin"):
            for key in iam.list_access_keys(UserName=user)["AccessKeyMetadata"]:
                iam.delete_access_key(UserName=user, AccessKeyId=key["AccessKeyId"])
            for policy in iam.list_attached_user_policies(UserName=user)["AttachedPolicies"]:
                iam.detach_user_policy(UserName=user, PolicyArn=policy["PolicyArn"])
                iam.delete_policy(PolicyArn=policy["PolicyArn"])
            for name in iam.list_user_policies(UserName=user)["PolicyNames"]:
                iam.delete_user_policy(UserName=user, PolicyName=name)
            iam.delete_user(UserName=user)

    def trainer_s3(self):
        key, secret = self.trainer_key
        return self.boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=key, aws_secret_access_key=secret
        )

    def trainer_fs(self):
        import s3fs

        key, secret = self.trainer_key
        fs = s3fs.S3FileSystem(
            key=key,
            secret=secret,
            endpoint_url=self.endpoint,
            skip_instance_cache=True,
            use_listings_cache=False,
        )
        fs.connect()
        return fs


@pytest.fixture(scope="module")
def moto_aws():
    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(var, raising=False)
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        mp.setenv("AWS_ACCESS_KEY_ID", "admin")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "admin")

        # werkzeug logs every request to stderr; keep failures readable.
        mp.setattr(logging.getLogger("werkzeug"), "level", logging.ERROR)
        port = _free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        aws = MotoAws(f"http://127.0.0.1:{port}")
        previous_auth = "inf"
        try:
            aws.setup(tfp.aws_run_policy(BUCKET, PREFIX))
            previous_auth = aws.set_auth("0")
            yield aws
        finally:
            # moto's auth switch and backends are process-global (shared with
            # any other in-process moto server): put them back as they were.
            try:
                aws.set_auth(previous_auth)
                aws.cleanup()
            finally:
                server.stop()


class _Denied:
    """Stands in for the HTTP response of a request refused client-side."""

    status_code = 403
    headers: dict[str, str] = {}


class S3CallGuard:
    """Records every S3 call s3fs makes and enforces the s3:prefix condition.

    moto checks actions and resource ARNs but ignores Condition blocks. This
    guard fills the gap on the client: each ListObjects(V2) call is checked
    against the policy's ListBucket statements with IAM StringLike semantics
    (tfp.list_prefix_allowed) and, if refused, answered with the AccessDenied
    error S3 would send - so s3fs and the operation sequence see what AWS
    would make them see.
    """

    def __init__(self, fs, policy: dict[str, Any], bucket_arn: str):
        self.policy = policy
        self.bucket_arn = bucket_arn
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.refused_list_prefixes: list[str | None] = []
        events = fs.s3.meta.events
        events.register("provide-client-params.s3", self._record)
        events.register("before-call.s3.ListObjectsV2", self._enforce_list_condition)
        events.register("before-call.s3.ListObjects", self._enforce_list_condition)

    def _record(self, params, model, context, **_):
        params = dict(params)
        context["cloudckpt_test_params"] = params
        self.calls.append((model.name, params))

    def _enforce_list_condition(self, context, **_):
        prefix = context["cloudckpt_test_params"].get("Prefix") or None
        if tfp.list_prefix_allowed(self.policy, self.bucket_arn, prefix):
            return None  # let moto answer
        self.refused_list_prefixes.append(prefix)
        return _Denied(), {
            "Error": {"Code": "AccessDenied", "Message": f"s3:prefix {prefix!r} refused by the run policy"},
            "ResponseMetadata": {"HTTPStatusCode": 403},
        }

    def names(self) -> set[str]:
        return {name for name, _ in self.calls}

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.calls if n == name)

    def list_prefixes(self) -> list[str | None]:
        return [p.get("Prefix") for n, p in self.calls if n in ("ListObjectsV2", "ListObjects")]


def cloudckpt_operations(fs, checkpoint_dir: str, workdir: Path) -> dict[str, Any]:
    """cloudckpt's own operations, through its library code, on the trainer's (policy-limited) s3fs:
    the fresh-run probe, two commits, a restore and a retention delete.

    ``fs`` is the trainer's s3fs instance, watched by ``S3CallGuard``; it is
    handed to cloudckpt's ``RemoteStore`` so the guard sees the library's real
    traffic.
    """
    from cloudckpt.catalog import scan_directory
    from cloudckpt.commit import LocalCheckpoint, commit_checkpoint
    from cloudckpt.remote import RemoteStore
    from cloudckpt.restore import download_verified
    from cloudckpt.retention import delete_checkpoint
    from cloudckpt.transfer import TransferOptions

    # 8 MiB parts: s3fs puts a file in one PutObject below 2 x chunksize, and the policy must allow multipart
    store = RemoteStore(checkpoint_dir, transfer=TransferOptions(part_size=8 * MiB))
    store.fs = fs  # the guarded, policy-limited client
    # Every request through that client, data too, so the guard sees all the verbs the policy must allow
    # (cloudckpt's own s3:// transport sends the same ones: PutObject, multipart, GetObject ranges).
    store._transport = None
    # One DeleteObject per object: AWS authorizes a bulk DeleteObjects per key as s3:DeleteObject (what the
    # policy grants), moto's IAM checks it as "s3:DeleteObjects" (moto/s3/responses.py) and refuses it.
    store._bulk_deletes = False
    basename = "model.ckpt"
    committed: dict[int, dict[str, bytes]] = {}

    store.check_usable()  # raises if the policy does not let a fresh run start
    names = {o.name for o in store.list_objects()}
    fresh = {"listed_empty": not names, "bucket_exists": True, "state_missing": "checkpoint" not in names}

    def commit(step: int) -> None:
        files = {
            f"{basename}-{step}.data-00000-of-00001": os.urandom(20 * MiB),  # multipart with 8 MiB parts
            f"{basename}-{step}.index": os.urandom(4096),
        }
        paths = {}
        for name, payload in files.items():
            (workdir / name).write_bytes(payload)
            paths[name] = str(workdir / name)
        commit_checkpoint(store, LocalCheckpoint(step, f"{basename}-{step}", paths))
        committed[step] = files

    commit(100)
    commit(200)
    scan = scan_directory(store)
    latest = scan.committed[-1]
    download_verified(store, latest, str(workdir / "restore"))
    restored = {f.name: (workdir / "restore" / f.name).read_bytes() for f in latest.files}
    delete_checkpoint(store, scan.committed[0])  # retention: manifest first, then its files
    remaining = sorted(p.rsplit("/", 1)[1] for p in fs.find(store.root) if "/.cloudckpt/" not in p)
    assert any("/.cloudckpt/log/" in p for p in fs.find(store.root))  # the commit log lives under the prefix
    return {
        "fresh": fresh,
        "committed": committed,
        "restored_step": latest.step,
        "restored": restored,
        "remaining": remaining,
    }


@pytest.fixture(scope="module")
def cloudckpt_run(moto_aws, tmp_path_factory):
    fs = moto_aws.trainer_fs()
    guard = S3CallGuard(fs, tfp.aws_run_policy(BUCKET, PREFIX), BUCKET_ARN)
    result = cloudckpt_operations(fs, f"s3://{BUCKET}/{PREFIX}", tmp_path_factory.mktemp("ckpt"))
    return result, guard


def test_moto_enforces_iam(moto_aws):
    # Guard against a vacuous pass: enforcement is really on - an unknown key
    # is refused, and so is the trainer outside its prefix.
    from botocore.exceptions import ClientError

    bogus = moto_aws.boto3.client(
        "s3", endpoint_url=moto_aws.endpoint, aws_access_key_id="AKIANOTAUSER0000000", aws_secret_access_key="x"
    )
    with pytest.raises(ClientError):
        bogus.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/")
    with pytest.raises(ClientError) as denied:
        moto_aws.trainer_s3().get_object(Bucket=BUCKET, Key="other/secret.txt")
    assert denied.value.response["Error"]["Code"] == "AccessDenied"


def test_cloudckpt_operations_succeed_under_the_run_prefix(cloudckpt_run):
    result, guard = cloudckpt_run
    assert result["fresh"] == {"listed_empty": True, "bucket_exists": True, "state_missing": True}
    assert result["restored_step"] == 200
    assert result["restored"] == result["committed"][200]
    assert result["remaining"] == sorted(
        ["checkpoint", "model.ckpt-200.manifest.json", *result["committed"][200]]
    )
    # The traffic really included the multipart path and every verb.
    assert guard.count("CreateMultipartUpload") >= 2  # one per commit
    assert guard.count("UploadPart") >= 6  # 3 parts each
    assert guard.count("CompleteMultipartUpload") >= 2
    # (No HeadObject needed any more: a commit learns sizes from its one listing, issue 16.)
    assert {"PutObject", "GetObject", "ListObjectsV2", "DeleteObject"} <= guard.names()


def test_s3fs_list_prefixes_satisfy_the_policy_condition(cloudckpt_run):
    _, guard = cloudckpt_run
    prefixes = guard.list_prefixes()
    assert f"{PREFIX}/" in prefixes
    # The only listing the condition refuses is s3fs's fallback for an empty
    # directory: after "<prefix>/" lists nothing, ls() lists the parent
    # ("runs/") to tell a file from a missing path, and ignores an error there
    # (`except OSError`). Granting "runs/" would reveal the other runs' keys.
    parent = PREFIX.rsplit("/", 1)[0] + "/"
    assert set(guard.refused_list_prefixes) <= {parent}, guard.refused_list_prefixes
    allowed = [p for p in prefixes if p not in guard.refused_list_prefixes]
    policy = tfp.aws_run_policy(BUCKET, PREFIX)
    assert all(tfp.list_prefix_allowed(policy, BUCKET_ARN, p) for p in allowed)


def test_s3_call_guard_refuses_listings_outside_the_prefix(moto_aws, cloudckpt_run):
    # The client-side s3:prefix enforcement is itself under test: listing the
    # bucket root or a sibling run fails the way AWS fails it.
    fs = moto_aws.trainer_fs()
    guard = S3CallGuard(fs, tfp.aws_run_policy(BUCKET, PREFIX), BUCKET_ARN)
    for path in (BUCKET, f"{BUCKET}/{PREFIX}-other", f"{BUCKET}/runs"):
        with pytest.raises(PermissionError):
            fs.find(path)
    assert fs.find(f"{BUCKET}/{PREFIX}")  # the run's own prefix lists fine
    assert guard.refused_list_prefixes == [None, f"{PREFIX}-other/", "runs/"]


def test_multipart_abort_and_list_parts_allowed(moto_aws):
    # s3fs's failure path: a multipart upload that is listed and aborted.
    s3 = moto_aws.trainer_s3()
    key = f"{PREFIX}/model.ckpt-300.data-00000-of-00001"
    upload = s3.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
    s3.upload_part(Bucket=BUCKET, Key=key, UploadId=upload, PartNumber=1, Body=b"x" * (5 * MiB))
    parts = s3.list_parts(Bucket=BUCKET, Key=key, UploadId=upload)["Parts"]
    assert [p["PartNumber"] for p in parts] == [1]
    s3.abort_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload)
    assert s3.get_bucket_location(Bucket=BUCKET)["LocationConstraint"] in (None, "us-east-1")


OUTSIDE_KEYS = [
    "other/secret.txt",  # another prefix
    f"{PREFIX}-other/model.ckpt-1.index",  # sibling run sharing the prefix string
    PREFIX,  # the bare prefix key is not under "<prefix>/"
    "runs/exp1x/file",
    "model.ckpt-1.index",  # bucket root
]


@pytest.mark.parametrize("key", OUTSIDE_KEYS)
def test_boto3_access_outside_the_prefix_is_denied(moto_aws, key):
    from botocore.exceptions import ClientError

    s3 = moto_aws.trainer_s3()
    attempts = {
        "GetObject": lambda: s3.get_object(Bucket=BUCKET, Key=key),
        "HeadObject": lambda: s3.head_object(Bucket=BUCKET, Key=key),
        "PutObject": lambda: s3.put_object(Bucket=BUCKET, Key=key, Body=b"overwrite"),
        "DeleteObject": lambda: s3.delete_object(Bucket=BUCKET, Key=key),
        "CreateMultipartUpload": lambda: s3.create_multipart_upload(Bucket=BUCKET, Key=key),
    }
    for name, attempt in attempts.items():
        with pytest.raises(ClientError) as denied:
            attempt()
        assert denied.value.response["Error"]["Code"] in ("AccessDenied", "403"), name
    # ...and nothing was changed behind the refusals.
    if key in ("other/secret.txt", f"{PREFIX}-other/model.ckpt-1.index", PREFIX):
        body = moto_aws.admin_s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert body == b"not yours"


@pytest.mark.parametrize("key", OUTSIDE_KEYS)
def test_s3fs_access_outside_the_prefix_is_denied(moto_aws, tmp_path, key):
    fs = moto_aws.trainer_fs()
    local = tmp_path / "big.bin"
    local.write_bytes(os.urandom(11 * MiB))
    with pytest.raises(PermissionError):
        fs.cat_file(f"{BUCKET}/{key}")
    with pytest.raises(PermissionError):
        fs.pipe_file(f"{BUCKET}/{key}", b"overwrite")
    with pytest.raises(PermissionError):
        fs.put_file(str(local), f"{BUCKET}/{key}", chunksize=5 * MiB)  # multipart
    with pytest.raises(PermissionError):
        fs.rm_file(f"{BUCKET}/{key}")


@pytest.fixture
def versioned_object(moto_aws):
    """Two versions of an object inside the prefix, removed afterwards so the
    prefix is empty again for the fresh-run part of cloudckpt_operations."""
    key = f"{PREFIX}/versioned.txt"
    admin = moto_aws.admin_s3
    admin.put_object(Bucket=BUCKET, Key=key, Body=b"v1")
    admin.put_object(Bucket=BUCKET, Key=key, Body=b"v2")
    yield key
    listing = admin.list_object_versions(Bucket=BUCKET, Prefix=key)
    for version in listing.get("Versions", []) + listing.get("DeleteMarkers", []):
        admin.delete_object(Bucket=BUCKET, Key=key, VersionId=version["VersionId"])


def test_actions_beyond_cloudckpt_are_denied_inside_the_prefix(moto_aws, versioned_object):
    from botocore.exceptions import ClientError

    s3 = moto_aws.trainer_s3()
    key = versioned_object
    versions = moto_aws.admin_s3.list_object_versions(Bucket=BUCKET, Prefix=key)["Versions"]
    old_version = next(v["VersionId"] for v in versions if not v["IsLatest"])
    attempts = {
        # versioning keeps history the trainer cannot read back or destroy
        "GetObjectVersion": lambda: s3.get_object(Bucket=BUCKET, Key=key, VersionId=old_version),
        "DeleteObjectVersion": lambda: s3.delete_object(Bucket=BUCKET, Key=key, VersionId=old_version),
        "PutObjectAcl": lambda: s3.put_object_acl(Bucket=BUCKET, Key=key, ACL="public-read"),
        "PutObjectTagging": lambda: s3.put_object_tagging(
            Bucket=BUCKET, Key=key, Tagging={"TagSet": [{"Key": "k", "Value": "v"}]}
        ),
        "ListBucketVersions": lambda: s3.list_object_versions(Bucket=BUCKET, Prefix=f"{PREFIX}/"),
        "ListAllMyBuckets": lambda: s3.list_buckets(),
        "PutBucketPolicy": lambda: s3.put_bucket_policy(
            Bucket=BUCKET, Policy=json.dumps({"Version": "2012-10-17", "Statement": []})
        ),
        "PutBucketVersioning": lambda: s3.put_bucket_versioning(
            Bucket=BUCKET, VersioningConfiguration={"Status": "Suspended"}
        ),
        "DeleteBucket": lambda: s3.delete_bucket(Bucket=BUCKET),
    }
    allowed = []
    for name, attempt in attempts.items():
        try:
            attempt()
        except ClientError as error:
            assert error.response["Error"]["Code"] in ("AccessDenied", "403"), (name, error)
        else:
            allowed.append(name)
    assert not allowed, f"run policy allows {allowed}"
    versions_after = moto_aws.admin_s3.list_object_versions(Bucket=BUCKET, Prefix=key)["Versions"]
    assert old_version in {v["VersionId"] for v in versions_after}
    # A plain delete (what retention does) only adds a delete marker.
    s3.delete_object(Bucket=BUCKET, Key=key)
    history = moto_aws.admin_s3.list_object_versions(Bucket=BUCKET, Prefix=key)
    assert len(history["Versions"]) == 2 and len(history["DeleteMarkers"]) == 1


# ============================================================= examples


def test_aws_example_spot_launch_template_uses_the_module():
    module = tfp.load_module(AWS_EXAMPLE)
    (call,) = [entry["checkpoints"] for entry in module["module"]]
    assert call["source"] == "../../modules/aws-checkpoint-bucket"
    assert call["create_instance_profile"] is True

    template = tfp.block(module, "resource", "aws_launch_template", "training")
    (market,) = template["instance_market_options"]
    assert market["market_type"] == "spot"
    assert template["iam_instance_profile"] == [{"arn": "${module.checkpoints.instance_profile_arn}"}]
    (metadata,) = template["metadata_options"]
    assert metadata["http_tokens"] == "required"  # IMDSv2 (cloudckpt polls spot/instance-action)
    assert metadata["http_put_response_hop_limit"] == 1
    (device,) = template["block_device_mappings"]
    assert device["ebs"][0]["encrypted"] is True
    assert template["user_data"] == "${base64encode(local.user_data)}"

    user_data_local = tfp.locals_of(module)["user_data"]
    assert "templates/user_data.sh.tftpl" in user_data_local
    assert "module.checkpoints.checkpoint_dir" in user_data_local


def test_gcp_example_spot_instance_template_uses_the_module():
    module = tfp.load_module(GCP_EXAMPLE)
    (call,) = [entry["checkpoints"] for entry in module["module"]]
    assert call["source"] == "../../modules/gcp-checkpoint-bucket"

    template = tfp.block(module, "resource", "google_compute_instance_template", "training")
    (scheduling,) = template["scheduling"]
    assert scheduling["provisioning_model"] == "SPOT"
    assert scheduling["preemptible"] is True
    assert scheduling["automatic_restart"] is False
    (account,) = template["service_account"]
    assert account["email"] == "${module.checkpoints.service_account_email}"
    metadata = template["metadata"]
    assert metadata["startup-script"] == "${local.startup_script}"
    assert "templates/shutdown.sh" in metadata["shutdown-script"]
    assert metadata["block-project-ssh-keys"] == "true"
    (interface,) = template["network_interface"]
    assert "access_config" not in interface, "training VMs get no external IP"
    (shielded,) = template["shielded_instance_config"]
    assert all(shielded.values())


def render_template(path: Path, values: dict[str, Any]) -> str:
    """Terraform templatefile() for the plain ${name} templates used here."""
    text = path.read_text()
    assert "%{" not in text, "template directives are not supported by this renderer"
    used = set(re.findall(r"(?<!\$)\$\{([a-z0-9_]+)\}", text))
    assert used == set(values), f"template vars {used} != provided {set(values)}"
    rendered = re.sub(r"(?<!\$)\$\{([a-z0-9_]+)\}", lambda m: str(values[m.group(1)]), text)
    return rendered.replace("$${", "${")


@pytest.mark.parametrize(
    "template, checkpoint_dir",
    [
        (AWS_EXAMPLE / "templates" / "user_data.sh.tftpl", "s3://ckpt-bucket/runs/demo"),
        (GCP_EXAMPLE / "templates" / "startup.sh.tftpl", "gs://ckpt-bucket/runs/demo"),
    ],
    ids=["aws-user-data", "gce-startup"],
)
def test_startup_script_renders_installs_cloudckpt_and_starts_training(template, checkpoint_dir):
    script = TRAINER.read_text()
    rendered = render_template(
        template,
        {
            "checkpoint_dir": checkpoint_dir,
            "pip_packages": "'cloudckpt' 'tensorflow-cpu'",
            "training_script_b64": base64.b64encode(script.encode()).decode(),
            "save_steps": 500,
            "max_steps": 1000,
        },
    )
    subprocess.run(["bash", "-n"], input=rendered, text=True, check=True)
    assert "pip\" install --quiet 'cloudckpt' 'tensorflow-cpu'" in rendered
    assert f"Environment=CLOUDCKPT_CHECKPOINT_DIR={checkpoint_dir}" in rendered
    assert "ExecStart=/opt/cloudckpt/venv/bin/python /opt/cloudckpt/train.py" in rendered
    assert "systemctl enable" in rendered
    encoded = re.search(r"echo '([A-Za-z0-9+/=]+)' \| base64 -d", rendered).group(1)
    assert base64.b64decode(encoded).decode() == script


def test_example_trainer_uses_the_hook_with_preemption():
    source = TRAINER.read_text()
    compile(source, str(TRAINER), "exec")
    assert 'os.environ["CLOUDCKPT_CHECKPOINT_DIR"]' in source
    assert re.search(
        r"cloudckpt\.CheckpointSaverHook\(\s*CHECKPOINT_DIR,\s*save_steps=SAVE_STEPS,\s*preemption=\"auto\"\s*\)",
        source,
    )


SHUTDOWN_SCRIPT = GCP_EXAMPLE / "templates" / "shutdown.sh"


def _stub_bin(tmp_path: Path, systemctl_active: bool) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "systemctl.log"
    (bin_dir / "systemctl").write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {log}\n'
        f'if [ "$1" = is-active ]; then exit {0 if systemctl_active else 3}; fi\n'
        "exit 0\n"
    )
    (bin_dir / "logger").write_text("#!/bin/sh\nexit 0\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    return bin_dir


def _reap_when_done(process: subprocess.Popen) -> threading.Thread:
    # On a VM systemd reaps the trainer; here the test is its parent, and an
    # unreaped (zombie) child still answers `kill -0`.
    reaper = threading.Thread(target=process.wait, daemon=True)
    reaper.start()
    return reaper


def _run_shutdown(tmp_path: Path, bin_dir: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SHUTDOWN_SCRIPT)],
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_gce_shutdown_script_stops_the_unit(tmp_path):
    bin_dir = _stub_bin(tmp_path, systemctl_active=True)
    result = _run_shutdown(tmp_path, bin_dir)
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "systemctl.log").read_text().splitlines()
    assert "stop cloudckpt-train.service" in calls


def test_gce_shutdown_script_forwards_sigterm_and_waits(tmp_path):
    bin_dir = _stub_bin(tmp_path, systemctl_active=False)
    marker = tmp_path / "got-sigterm"
    # A fake trainer that needs 2 s to "commit" after SIGTERM.
    trainer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, sys, time\n"
            "def stop(*_):\n"
            "    time.sleep(2)\n"
            f"    open({str(marker)!r}, 'w').write('committed')\n"
            "    sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, stop)\n"
            "time.sleep(60)\n",
        ]
    )
    trainer_reaper = _reap_when_done(trainer)
    try:
        time.sleep(0.5)  # let it install the handler
        pid_file = tmp_path / "trainer.pid"
        pid_file.write_text(str(trainer.pid))
        started = time.monotonic()
        result = _run_shutdown(tmp_path, bin_dir, CLOUDCKPT_PID_FILE=str(pid_file))
        elapsed = time.monotonic() - started
        assert result.returncode == 0, result.stderr
        assert marker.read_text() == "committed"  # SIGTERM reached the trainer
        assert 1.5 <= elapsed < 10, elapsed  # ...and the script waited for it
        trainer_reaper.join(timeout=5)
        assert trainer.returncode == 0
    finally:
        if trainer.poll() is None:
            trainer.kill()


def test_gce_shutdown_script_gives_up_after_the_grace_period(tmp_path):
    bin_dir = _stub_bin(tmp_path, systemctl_active=False)
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"]
    )
    _reap_when_done(stubborn)
    try:
        time.sleep(0.5)
        pid_file = tmp_path / "trainer.pid"
        pid_file.write_text(str(stubborn.pid))
        started = time.monotonic()
        result = _run_shutdown(tmp_path, bin_dir, CLOUDCKPT_PID_FILE=str(pid_file), CLOUDCKPT_GRACE_SECONDS="2")
        elapsed = time.monotonic() - started
        assert result.returncode == 0
        assert 2 <= elapsed < 8, elapsed
        assert "still running" in result.stdout
    finally:
        stubborn.kill()
        stubborn.wait()


# ============================================================ 2. checkov

# The complete list of accepted checkov skips: (check id, resource). Each is
# an inline `#checkov:skip=<ID>:<reason>` next to the resource; the test below
# fails on any other skip, on a skip without a reason, and on an inline skip
# that no longer suppresses anything.
EXPECTED_CHECKOV_SKIPS = {
    # Cross-region replication: doubles storage cost for checkpoints, which a
    # re-run reproduces; versioning + lifecycle cover accidental deletes.
    ("CKV_AWS_144", "aws_s3_bucket.this"),
    # Event notifications: nothing consumes them; readers list the prefix and
    # read the manifest.
    ("CKV2_AWS_62", "aws_s3_bucket.this"),
}

CHECKOV_REQUIREMENT = "checkov==3.3.30"
# Each target is scanned on its own: the examples (which pull in the modules
# with the examples' inputs) and each module with its own defaults.
CHECKOV_TARGETS = {
    "terraform": TERRAFORM_DIR,
    "aws-module": AWS_MODULE,
    "gcp-module": GCP_MODULE,
}
# No network: no Prisma Cloud downloads or uploads, no PyPI version check.
CHECKOV_ENV = {
    "BC_SKIP_MAPPING": "TRUE",
    "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true",
    "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false",
    "LOG_LEVEL": "WARNING",
}


def _checkov_executable() -> Path:
    override = os.environ.get("CLOUDCKPT_CHECKOV")
    if override:
        path = Path(override)
        assert path.is_file(), f"CLOUDCKPT_CHECKOV={override} does not exist"
        return path
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cloudckpt"
    venv = cache / CHECKOV_REQUIREMENT.replace("==", "-")
    executable = venv / "bin" / "checkov"
    cache.mkdir(parents=True, exist_ok=True)
    lock_path = Path(tempfile.gettempdir()) / "cloudckpt-venv-checkov.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one installer at a time (xdist)
        if not executable.exists():
            if venv.exists():
                shutil.rmtree(venv)  # half-built by an interrupted run
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run(
                [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", CHECKOV_REQUIREMENT],
                check=True,
                timeout=1800,
            )
    return executable


def _run_checkov(executable: Path, target: Path) -> dict[str, Any]:
    result = subprocess.run(
        [
            str(executable),
            "--directory",
            str(target),
            "--framework",
            "terraform",
            "--output",
            "json",
            "--skip-download",
            "--skip-results-upload",
        ],
        env={**os.environ, **CHECKOV_ENV},
        capture_output=True,
        text=True,
        timeout=600,
    )
    # Exit status 1 just means failed checks; the JSON says which.
    assert result.returncode in (0, 1), result.stderr[-4000:]
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    (terraform,) = [r for r in reports if r.get("check_type") == "terraform"]
    return terraform


@pytest.fixture(scope="session")
def checkov_reports() -> dict[str, dict[str, Any]]:
    executable = _checkov_executable()
    with ThreadPoolExecutor(max_workers=len(CHECKOV_TARGETS)) as pool:
        futures = {name: pool.submit(_run_checkov, executable, path) for name, path in CHECKOV_TARGETS.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("target", sorted(CHECKOV_TARGETS))
def test_checkov_reports_no_failed_checks(checkov_reports, target):
    report = checkov_reports[target]
    summary = report["summary"]
    failed = [
        f"{c['check_id']} {c['resource']} ({c['file_path']}): {c['check_name']}"
        for c in report["results"]["failed_checks"]
    ]
    assert summary["failed"] == 0 and not failed, "\n".join(failed)
    assert summary["parsing_errors"] == 0
    assert summary["passed"] > 0 and summary["resource_count"] > 0


def _short_resource(resource: str) -> str:
    # "module.checkpoints.aws_s3_bucket.this" -> "aws_s3_bucket.this"
    return ".".join(resource.split(".")[-2:])


def test_checkov_skips_are_inline_justified_and_listed(checkov_reports):
    skipped = {}
    for report in checkov_reports.values():
        for check in report["results"]["skipped_checks"]:
            key = (check["check_id"], _short_resource(check["resource"]))
            skipped[key] = (check.get("check_result") or {}).get("suppress_comment", "")

    # Every skip is one we know about, with a real reason...
    assert set(skipped) == EXPECTED_CHECKOV_SKIPS
    for key, reason in skipped.items():
        assert len(reason.strip()) >= 40, f"{key}: reason too thin: {reason!r}"

    # ...and written inline: no config file or CLI flag suppresses checks.
    inline = set()
    for path in tfp.tf_files():
        for match in re.finditer(r"#\s*checkov:skip=([A-Z0-9_]+):(.*)", path.read_text()):
            inline.add(match.group(1))
            assert match.group(2).strip(), f"{path}: skip without reason"
    assert inline == {check_id for check_id, _ in EXPECTED_CHECKOV_SKIPS}
    readme = (TERRAFORM_DIR / "README.md").read_text()
    for check_id, _ in EXPECTED_CHECKOV_SKIPS:
        assert f"`{check_id}`" in readme, f"{check_id} not explained in terraform/README.md"
    for name in (".checkov.yml", ".checkov.yaml"):
        assert not (REPO_ROOT / name).exists() and not (TERRAFORM_DIR / name).exists()
