# Training identity: a dedicated service account holding
# roles/storage.objectUser on the bucket, limited by an IAM condition to the
# run prefix.
#
# Object operations (create, get, delete, multipart parts) are checked against
# the object's resource name; listing is checked against the bucket, with the
# request's list prefix exposed as storage.googleapis.com/objectListPrefix.
# The condition allows both, and nothing outside "<run_prefix>/".

locals {
  # One CEL term per line, OR-ed together below. The test suite reads these
  # terms from this file and evaluates them against object names and list
  # prefixes, so keep them plain strings.
  run_prefix_condition_terms = [
    # Objects of this run. The trailing "/" keeps "<run_prefix>-other/" out.
    "resource.name.startsWith(\"projects/_/buckets/${google_storage_bucket.this.name}/objects/${var.run_prefix}/\")",
    # Listings of the run: fsspec clients list "<run_prefix>/..." and
    # sometimes the bare "<run_prefix>" (info of the directory entry).
    "api.getAttribute(\"storage.googleapis.com/objectListPrefix\", \"\") == \"${var.run_prefix}\"",
    "api.getAttribute(\"storage.googleapis.com/objectListPrefix\", \"\").startsWith(\"${var.run_prefix}/\")",
  ]

  run_prefix_condition = join(" || ", local.run_prefix_condition_terms)
}

resource "google_service_account" "training" {
  project      = var.project_id
  account_id   = var.service_account_id
  display_name = "cloudckpt training"
  # Service account descriptions are limited to 256 characters.
  description = substr("Reads and writes checkpoints under gs://${var.bucket_name}/${var.run_prefix}/ only.", 0, 256)
}

resource "google_storage_bucket_iam_member" "training" {
  bucket = google_storage_bucket.this.name
  role   = "roles/storage.objectUser"
  member = "serviceAccount:${google_service_account.training.email}"

  condition {
    title       = "cloudckpt-run-prefix"
    description = substr("Only objects under ${var.run_prefix}/ and listings of that prefix.", 0, 256)
    expression  = local.run_prefix_condition
  }
}
