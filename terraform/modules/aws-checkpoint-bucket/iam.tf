# IAM for one training run: exactly the S3 calls cloudckpt makes through
# s3fs, on the run prefix only.
#
#   commit     PutObject, CreateMultipartUpload/UploadPart/CompleteMultipartUpload
#              (all authorised by s3:PutObject), HeadObject (s3:GetObject)
#   restore    ListObjectsV2 with Prefix=<run_prefix>[/...] (s3:ListBucket),
#              GetObject
#   retention  DeleteObject / DeleteObjects (s3:DeleteObject, checked per key)
#   failure    AbortMultipartUpload, ListParts (s3:ListMultipartUploadParts)
#
# Deliberately absent: s3:DeleteObjectVersion and s3:GetObjectVersion (a
# compromised trainer can add delete markers but cannot destroy the history
# that versioning keeps), any ACL/tagging/bucket-configuration action, and any
# access outside "<run_prefix>/".
#
# Keep these statements literal (plain lists, `local.*` references): the test
# suite reads them from this file, substitutes the locals and evaluates the
# result against a moto S3 server with IAM enforcement.

locals {
  bucket_arn = aws_s3_bucket.this.arn
  run_prefix = var.run_prefix
}

data "aws_iam_policy_document" "run" {
  # Objects of this run. The "/" before "*" matters: "runs/exp1/*" does not
  # match "runs/exp1-other/...".
  statement {
    sid    = "RunObjectReadWrite"
    effect = "Allow"
    actions = [
      "s3:PutObject",
      "s3:GetObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = ["${local.bucket_arn}/${local.run_prefix}/*"]
  }

  # Listing, restricted to the run prefix. s3fs lists "<run_prefix>/" (ls,
  # find, info of a missing key) and "<run_prefix>" itself (ls of the parent
  # entry), hence the two patterns.
  statement {
    sid       = "RunPrefixList"
    effect    = "Allow"
    actions   = ["s3:ListBucket"]
    resources = [local.bucket_arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = [local.run_prefix, "${local.run_prefix}/*"]
    }
  }

  # Region discovery by the AWS SDKs / s3fs bucket probes. Reveals only the
  # bucket's region.
  statement {
    sid       = "BucketLocation"
    effect    = "Allow"
    actions   = ["s3:GetBucketLocation"]
    resources = [local.bucket_arn]
  }

  # SSE-KMS only: S3 calls KMS on the caller's behalf for every put (data key)
  # and get/multipart upload (decrypt). Restricted to this bucket's encryption
  # context (S3 Bucket Keys use the bucket ARN as context).
  dynamic "statement" {
    for_each = var.kms_key_arn == null ? [] : [var.kms_key_arn]

    content {
      sid       = "RunObjectKms"
      effect    = "Allow"
      actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
      resources = [statement.value]

      condition {
        test     = "StringEquals"
        variable = "kms:EncryptionContext:aws:s3:arn"
        values   = [local.bucket_arn]
      }
    }
  }
}

# Customer-managed policy, to attach to principals outside this module.
resource "aws_iam_policy" "run" {
  count = var.create_managed_policy ? 1 : 0

  name        = "${var.name}-checkpoint-access"
  description = "cloudckpt: read/write checkpoints under s3://${var.bucket_name}/${var.run_prefix}/ only"
  policy      = data.aws_iam_policy_document.run.json
  tags        = var.tags
}

# Optional EC2 role + instance profile holding exactly the run policy.
data "aws_iam_policy_document" "ec2_assume_role" {
  statement {
    sid     = "Ec2AssumeRole"
    effect  = "Allow"
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "training" {
  count = var.create_instance_profile ? 1 : 0

  name                 = "${var.name}-training"
  description          = "cloudckpt training instances: checkpoints under s3://${var.bucket_name}/${var.run_prefix}/"
  assume_role_policy   = data.aws_iam_policy_document.ec2_assume_role.json
  permissions_boundary = var.permissions_boundary_arn
  tags                 = var.tags
}

resource "aws_iam_role_policy" "training" {
  count = var.create_instance_profile ? 1 : 0

  name   = "${var.name}-checkpoint-access"
  role   = aws_iam_role.training[0].id
  policy = data.aws_iam_policy_document.run.json
}

resource "aws_iam_instance_profile" "training" {
  count = var.create_instance_profile ? 1 : 0

  name = "${var.name}-training"
  role = aws_iam_role.training[0].name
  tags = var.tags
}
