output "checkpoint_dir" {
  description = "URL the training script receives as CLOUDCKPT_CHECKPOINT_DIR; pass the same value to cloudckpt.CheckpointSaverHook anywhere else (e.g. to restore on a workstation)."
  value       = module.checkpoints.checkpoint_dir
}

output "bucket_name" {
  description = "Name of the checkpoint bucket."
  value       = module.checkpoints.bucket_name
}

output "service_account_email" {
  description = "Training service account attached to the VMs."
  value       = module.checkpoints.service_account_email
}

output "instance_template_self_link" {
  description = "Self link of the Spot instance template; start a VM with `gcloud compute instances create NAME --zone ZONE --source-instance-template <self link>`."
  value       = google_compute_instance_template.training.self_link
}
