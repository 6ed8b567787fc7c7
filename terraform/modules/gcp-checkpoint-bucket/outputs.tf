output "checkpoint_dir" {
  description = "URL to pass as checkpoint_dir to cloudckpt.CheckpointSaverHook (gs://<bucket>/<run_prefix>)."
  value       = "gs://${google_storage_bucket.this.name}/${var.run_prefix}"
}

output "bucket_name" {
  description = "Name of the checkpoint bucket."
  value       = google_storage_bucket.this.name
}

output "bucket_url" {
  description = "gs:// URL of the whole bucket."
  value       = google_storage_bucket.this.url
}

output "run_prefix" {
  description = "Object name prefix of the run inside the bucket (no leading or trailing slash)."
  value       = var.run_prefix
}

output "service_account_email" {
  description = "Email of the training service account; attach it to the training VMs (see examples/gcp-spot-training)."
  value       = google_service_account.training.email
}

output "service_account_name" {
  description = "Fully qualified name (projects/<project>/serviceAccounts/<email>) of the training service account."
  value       = google_service_account.training.name
}

output "iam_condition_expression" {
  description = "CEL expression restricting the training service account's roles/storage.objectUser binding to the run prefix. Reuse it to grant other principals the same access."
  value       = local.run_prefix_condition
}
