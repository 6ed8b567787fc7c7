output "checkpoint_dir" {
  description = "URL to pass as checkpoint_dir to cloudckpt.CheckpointSaverHook (s3://<bucket>/<run_prefix>)."
  value       = "s3://${aws_s3_bucket.this.id}/${var.run_prefix}"
}

output "bucket_name" {
  description = "Name of the checkpoint bucket."
  value       = aws_s3_bucket.this.id
}

output "bucket_arn" {
  description = "ARN of the checkpoint bucket."
  value       = aws_s3_bucket.this.arn
}

output "run_prefix" {
  description = "Key prefix of the run inside the bucket (no leading or trailing slash)."
  value       = var.run_prefix
}

output "iam_policy_json" {
  description = "IAM policy document (JSON) granting exactly what cloudckpt needs on the run prefix. Attach it to any principal that trains or restores."
  value       = data.aws_iam_policy_document.run.json
}

output "iam_policy_arn" {
  description = "ARN of the customer-managed policy holding iam_policy_json, or null when create_managed_policy is false."
  value       = one(aws_iam_policy.run[*].arn)
}

output "role_name" {
  description = "Name of the EC2 training role, or null when create_instance_profile is false."
  value       = one(aws_iam_role.training[*].name)
}

output "role_arn" {
  description = "ARN of the EC2 training role, or null when create_instance_profile is false."
  value       = one(aws_iam_role.training[*].arn)
}

output "instance_profile_name" {
  description = "Name of the EC2 instance profile, or null when create_instance_profile is false."
  value       = one(aws_iam_instance_profile.training[*].name)
}

output "instance_profile_arn" {
  description = "ARN of the EC2 instance profile, or null when create_instance_profile is false."
  value       = one(aws_iam_instance_profile.training[*].arn)
}
