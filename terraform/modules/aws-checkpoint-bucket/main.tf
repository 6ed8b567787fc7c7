# S3 bucket that holds cloudckpt checkpoints.
#
# Everything the bucket needs to be safe by default lives here: versioning,
# default encryption, the four public access block settings, BucketOwnerEnforced
# ownership (ACLs disabled), a TLS-only bucket policy and lifecycle rules.

locals {
  access_log_prefix = coalesce(var.access_log_prefix, "s3-access-logs/${var.bucket_name}/")
}

resource "aws_s3_bucket" "this" {
  #checkov:skip=CKV_AWS_144:Cross-region replication doubles storage cost for checkpoints, which are reproducible by re-running training; versioning plus the noncurrent-version lifecycle covers accidental deletes. Add replication in the caller if the run is irreplaceable.
  #checkov:skip=CKV2_AWS_62:Event notifications have no consumer here: cloudckpt readers discover checkpoints by listing the prefix and reading the manifest, not from S3 events.
  bucket        = var.bucket_name
  force_destroy = var.force_destroy
  tags          = var.tags
}

# Every checkpoint overwrite (the `checkpoint` state file) and every retention
# delete leaves a noncurrent version that the lifecycle rule below expires.
resource "aws_s3_bucket_versioning" "this" {
  bucket = aws_s3_bucket.this.id

  versioning_configuration {
    status = "Enabled"
  }
}

# SSE-S3 by default; SSE-KMS with an S3 Bucket Key when a key ARN is given.
resource "aws_s3_bucket_server_side_encryption_configuration" "this" {
  bucket = aws_s3_bucket.this.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = var.kms_key_arn == null ? "AES256" : "aws:kms"
      kms_master_key_id = var.kms_key_arn
    }
    # Bucket keys cut KMS request costs for the many small manifest/state
    # writes; they have no effect with SSE-S3.
    bucket_key_enabled = var.kms_key_arn != null
  }
}

resource "aws_s3_bucket_public_access_block" "this" {
  bucket = aws_s3_bucket.this.id

  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

# ACLs disabled: the bucket owner owns every object and access is decided by
# IAM and the bucket policy only.
resource "aws_s3_bucket_ownership_controls" "this" {
  bucket = aws_s3_bucket.this.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

# Deny every request that is not made over TLS (>= 1.2), whoever makes it.
data "aws_iam_policy_document" "bucket" {
  statement {
    sid     = "DenyInsecureTransport"
    effect  = "Deny"
    actions = ["s3:*"]
    resources = [
      aws_s3_bucket.this.arn,
      "${aws_s3_bucket.this.arn}/*",
    ]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }

  statement {
    sid     = "DenyOutdatedTls"
    effect  = "Deny"
    actions = ["s3:*"]
    resources = [
      aws_s3_bucket.this.arn,
      "${aws_s3_bucket.this.arn}/*",
    ]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "NumericLessThan"
      variable = "s3:TlsVersion"
      values   = ["1.2"]
    }
  }
}

resource "aws_s3_bucket_policy" "this" {
  bucket = aws_s3_bucket.this.id
  policy = data.aws_iam_policy_document.bucket.json

  # The public access block must exist before a bucket policy is written, or
  # S3 may evaluate the policy against a bucket that is still open.
  depends_on = [aws_s3_bucket_public_access_block.this]
}

resource "aws_s3_bucket_lifecycle_configuration" "this" {
  bucket = aws_s3_bucket.this.id

  # Retention deletes and `checkpoint` overwrites leave noncurrent versions:
  # keep them for a grace period, then remove them (and the delete markers
  # left behind once no version remains).
  rule {
    id     = "expire-noncurrent-versions"
    status = "Enabled"

    filter {}

    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_expiration_days
    }

    expiration {
      expired_object_delete_marker = true
    }
  }

  # A trainer killed in the middle of a multipart upload (spot preemption)
  # leaves parts that are billed but invisible; drop them after one day.
  rule {
    id     = "abort-incomplete-multipart-uploads"
    status = "Enabled"

    filter {}

    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }

  # Lifecycle rules act on versions, so versioning has to be on first.
  depends_on = [aws_s3_bucket_versioning.this]
}

# Optional server access logging to an existing log bucket.
resource "aws_s3_bucket_logging" "this" {
  count = var.access_log_bucket == null ? 0 : 1

  bucket        = aws_s3_bucket.this.id
  target_bucket = var.access_log_bucket
  target_prefix = local.access_log_prefix
}
