# Cloud Storage bucket that holds cloudckpt checkpoints: uniform bucket-level
# access (no object ACLs), public access prevention enforced, versioning,
# soft delete and lifecycle rules.

resource "google_storage_bucket" "this" {
  project       = var.project_id
  name          = var.bucket_name
  location      = var.location
  storage_class = var.storage_class
  force_destroy = var.force_destroy
  labels        = var.labels

  # IAM only; also required for the conditional (prefix-restricted) binding
  # in iam.tf.
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"

  versioning {
    enabled = true
  }

  # Deleted objects (including versions removed by the rule below) stay
  # restorable for soft_delete_retention_days.
  soft_delete_policy {
    retention_duration_seconds = var.soft_delete_retention_days * 86400
  }

  # Retention deletes and `checkpoint` overwrites leave noncurrent versions:
  # keep them for a grace period, then delete them.
  lifecycle_rule {
    condition {
      with_state                 = "ARCHIVED"
      days_since_noncurrent_time = var.noncurrent_version_delete_days
    }
    action {
      type = "Delete"
    }
  }

  # XML-API multipart uploads abandoned by a preempted trainer.
  lifecycle_rule {
    condition {
      age = 1
    }
    action {
      type = "AbortIncompleteMultipartUpload"
    }
  }

  dynamic "logging" {
    for_each = var.access_log_bucket == null ? [] : [var.access_log_bucket]

    content {
      log_bucket        = logging.value
      log_object_prefix = "gcs-usage-logs/${var.bucket_name}/"
    }
  }
}
