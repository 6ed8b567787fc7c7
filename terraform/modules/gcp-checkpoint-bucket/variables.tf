variable "project_id" {
  type        = string
  description = "ID of the Google Cloud project that owns the bucket and the training service account."

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.project_id))
    error_message = "project_id must be a valid project ID (6-30 characters, lowercase letters, digits and hyphens, starting with a letter)."
  }
}

variable "bucket_name" {
  type        = string
  description = "Name of the Cloud Storage bucket to create for checkpoints (globally unique, 3-63 characters, lowercase letters, digits, \"-\", \"_\" and \".\", starting and ending with a letter or digit)."

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$", var.bucket_name)) && !startswith(var.bucket_name, "goog")
    error_message = "bucket_name must be 3-63 characters of lowercase letters, digits, \"-\", \"_\", \".\", start and end with a letter or digit, and not start with \"goog\"."
  }
}

variable "location" {
  type        = string
  description = "Bucket location: a region (e.g. \"us-central1\", best when the training VMs run in the same region) or a multi-region (\"US\", \"EU\", \"ASIA\")."
}

variable "storage_class" {
  type        = string
  description = "Default storage class of the bucket."
  default     = "STANDARD"

  validation {
    condition     = contains(["STANDARD", "NEARLINE", "COLDLINE", "ARCHIVE"], var.storage_class)
    error_message = "storage_class must be one of STANDARD, NEARLINE, COLDLINE, ARCHIVE."
  }
}

variable "run_prefix" {
  type        = string
  description = "Object name prefix of the training run inside the bucket, without leading or trailing slash (for example \"runs/resnet50-exp1\"). The IAM condition grants access to \"<run_prefix>/\" only, so sibling prefixes such as \"<run_prefix>-other/\" stay out of reach."

  validation {
    # No quotes, backslashes or wildcards: the value is pasted into a CEL
    # expression, where they could change its meaning.
    condition     = can(regex("^[A-Za-z0-9_.=-]+(/[A-Za-z0-9_.=-]+)*$", var.run_prefix)) && length(var.run_prefix) <= 512
    error_message = "run_prefix must be 1-512 characters of letters, digits, \"_\", \".\", \"=\", \"-\" in \"/\"-separated segments, without leading or trailing \"/\"."
  }
}

variable "noncurrent_version_delete_days" {
  type        = number
  description = "Days after which noncurrent object versions (overwritten or deleted checkpoints) are deleted. Versioning keeps a deleted or overwritten checkpoint recoverable for this long."
  default     = 30

  validation {
    condition     = var.noncurrent_version_delete_days >= 1 && var.noncurrent_version_delete_days <= 3650 && floor(var.noncurrent_version_delete_days) == var.noncurrent_version_delete_days
    error_message = "noncurrent_version_delete_days must be a whole number between 1 and 3650."
  }
}

variable "soft_delete_retention_days" {
  type        = number
  description = "Soft-delete retention in days: deleted objects (including expired noncurrent versions) stay restorable for this long. 0 disables soft delete; otherwise Cloud Storage accepts 7 to 90 days."
  default     = 7

  validation {
    condition     = var.soft_delete_retention_days == 0 || (var.soft_delete_retention_days >= 7 && var.soft_delete_retention_days <= 90 && floor(var.soft_delete_retention_days) == var.soft_delete_retention_days)
    error_message = "soft_delete_retention_days must be 0 or a whole number between 7 and 90."
  }
}

variable "access_log_bucket" {
  type        = string
  description = "Name of an existing bucket that receives usage logs for the checkpoint bucket. Null (default) disables usage logging (Cloud Audit Logs still record admin activity)."
  default     = null
}

variable "force_destroy" {
  type        = bool
  description = "Allow `terraform destroy` to delete the bucket even when it still holds checkpoints. Keep false for real training runs."
  default     = false
}

variable "service_account_id" {
  type        = string
  description = "account_id of the training service account to create (the part before \"@\")."
  default     = "cloudckpt-training"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.service_account_id))
    error_message = "service_account_id must be 6-30 characters of lowercase letters, digits and hyphens, starting with a letter."
  }
}

variable "labels" {
  type        = map(string)
  description = "Labels added to the bucket."
  default     = {}
}
