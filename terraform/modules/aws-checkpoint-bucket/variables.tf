variable "bucket_name" {
  type        = string
  description = "Name of the S3 bucket to create for checkpoints. Must be globally unique and follow the S3 naming rules (3-63 characters, lowercase letters, digits, dots and hyphens, starting and ending with a letter or digit)."

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.bucket_name)) && !strcontains(var.bucket_name, "..")
    error_message = "bucket_name must be 3-63 characters of lowercase letters, digits, dots and hyphens, start and end with a letter or digit, and not contain \"..\"."
  }
}

variable "run_prefix" {
  type        = string
  description = "Key prefix of the training run inside the bucket, without leading or trailing slash (for example \"runs/resnet50-exp1\"). The IAM policy grants access to \"<run_prefix>/*\" only, so sibling prefixes such as \"<run_prefix>-other/\" stay out of reach."

  validation {
    # No wildcards, no empty segments, no leading/trailing slash: the value is
    # pasted into IAM resource ARNs and s3:prefix conditions, where "*" or "?"
    # would widen the grant.
    condition     = can(regex("^[A-Za-z0-9_.=-]+(/[A-Za-z0-9_.=-]+)*$", var.run_prefix)) && length(var.run_prefix) <= 512
    error_message = "run_prefix must be 1-512 characters of letters, digits, \"_\", \".\", \"=\", \"-\" in \"/\"-separated segments, without leading or trailing \"/\" and without wildcards."
  }
}

variable "kms_key_arn" {
  type        = string
  description = "ARN of a customer-managed KMS key for default bucket encryption (SSE-KMS, with S3 Bucket Keys). Null (default) uses SSE-S3 (AES256). When set, the run policy also grants kms:Decrypt and kms:GenerateDataKey on this key, restricted to this bucket's encryption context."
  default     = null

  validation {
    condition     = var.kms_key_arn == null || can(regex("^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/[A-Za-z0-9-]+$", var.kms_key_arn))
    error_message = "kms_key_arn must be null or a KMS key ARN (arn:aws:kms:<region>:<account>:key/<key-id>); aliases are not accepted because IAM policies cannot be scoped to them."
  }
}

variable "noncurrent_version_expiration_days" {
  type        = number
  description = "Days after which noncurrent object versions (overwritten or deleted checkpoints) are permanently removed. Versioning keeps a deleted or overwritten checkpoint recoverable for this long."
  default     = 30

  validation {
    condition     = var.noncurrent_version_expiration_days >= 1 && var.noncurrent_version_expiration_days <= 3650 && floor(var.noncurrent_version_expiration_days) == var.noncurrent_version_expiration_days
    error_message = "noncurrent_version_expiration_days must be a whole number between 1 and 3650."
  }
}

variable "access_log_bucket" {
  type        = string
  description = "Name of an existing bucket that receives S3 server access logs for the checkpoint bucket. Null (default) disables access logging. The target bucket must allow the S3 logging service to write to it."
  default     = null

  validation {
    condition     = var.access_log_bucket == null || can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.access_log_bucket))
    error_message = "access_log_bucket must be null or a valid S3 bucket name."
  }
}

variable "access_log_prefix" {
  type        = string
  description = "Key prefix for access log objects in access_log_bucket. Null (default) uses \"s3-access-logs/<bucket_name>/\"."
  default     = null
}

variable "force_destroy" {
  type        = bool
  description = "Allow `terraform destroy` to delete the bucket even when it still holds checkpoints (and their noncurrent versions). Keep false for real training runs."
  default     = false
}

variable "name" {
  type        = string
  description = "Name stem for the IAM resources this module creates (\"<name>-checkpoint-access\" policy, \"<name>-training\" role and instance profile). Must be unique per account when several module instances exist."
  default     = "cloudckpt"

  validation {
    condition     = can(regex("^[A-Za-z0-9+=,.@_-]{1,40}$", var.name))
    error_message = "name must be 1-40 characters of letters, digits and +=,.@_- (IAM name rules, leaving room for the suffixes)."
  }
}

variable "create_managed_policy" {
  type        = bool
  description = "Create a customer-managed IAM policy (aws_iam_policy) holding the run policy, to attach to users, roles or SageMaker execution roles outside this module. The JSON is always available in the iam_policy_json output."
  default     = true
}

variable "create_instance_profile" {
  type        = bool
  description = "Create an IAM role that EC2 can assume, holding exactly the run policy, and an instance profile for it (used by examples/aws-spot-training)."
  default     = false
}

variable "permissions_boundary_arn" {
  type        = string
  description = "Optional permissions boundary policy ARN attached to the training role (some organisations require one on every role)."
  default     = null
}

variable "tags" {
  type        = map(string)
  description = "Tags added to every taggable resource of the module."
  default     = {}
}
