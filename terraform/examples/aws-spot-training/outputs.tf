output "checkpoint_dir" {
  description = "URL the training script receives as CLOUDCKPT_CHECKPOINT_DIR; pass the same value to cloudckpt.CheckpointSaverHook anywhere else (e.g. to restore on a workstation)."
  value       = module.checkpoints.checkpoint_dir
}

output "bucket_name" {
  description = "Name of the checkpoint bucket."
  value       = module.checkpoints.bucket_name
}

output "launch_template_id" {
  description = "ID of the Spot launch template; start instances with `aws ec2 run-instances --launch-template LaunchTemplateId=<id>`."
  value       = aws_launch_template.training.id
}

output "launch_template_latest_version" {
  description = "Latest version of the launch template."
  value       = aws_launch_template.training.latest_version
}

output "instance_profile_name" {
  description = "Instance profile attached by the launch template."
  value       = module.checkpoints.instance_profile_name
}

output "iam_policy_json" {
  description = "The run policy held by the instance role."
  value       = module.checkpoints.iam_policy_json
}
