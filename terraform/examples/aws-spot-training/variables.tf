variable "region" {
  type        = string
  description = "AWS region for the bucket and the training instances (same region avoids cross-region transfer charges)."
  default     = "us-east-1"

  validation {
    condition     = can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9]$", var.region))
    error_message = "region must look like \"us-east-1\"."
  }
}

variable "name" {
  type        = string
  description = "Name stem for every resource of the example (IAM role, launch template, security group)."
  default     = "cloudckpt-demo"

  validation {
    condition     = can(regex("^[A-Za-z0-9-]{1,32}$", var.name))
    error_message = "name must be 1-32 letters, digits or hyphens."
  }
}

variable "bucket_name" {
  type        = string
  description = "Globally unique name of the checkpoint bucket to create."
}

variable "run_prefix" {
  type        = string
  description = "Key prefix of this training run inside the bucket, without leading or trailing slash."
  default     = "runs/demo"
}

variable "vpc_id" {
  type        = string
  description = "VPC of the training instances (for the egress-only security group)."

  validation {
    condition     = can(regex("^vpc-[0-9a-f]+$", var.vpc_id))
    error_message = "vpc_id must look like \"vpc-0123abcd\"."
  }
}

variable "subnet_id" {
  type        = string
  description = "Subnet of the training instances. It needs a route to PyPI (NAT gateway, or a public IP with associate_public_ip_address) and to S3 (a gateway VPC endpoint keeps checkpoint traffic off the NAT)."

  validation {
    condition     = can(regex("^subnet-[0-9a-f]+$", var.subnet_id))
    error_message = "subnet_id must look like \"subnet-0123abcd\"."
  }
}

variable "associate_public_ip_address" {
  type        = bool
  description = "Give instances a public IPv4 address (only for subnets without a NAT gateway). Inbound traffic stays blocked by the security group."
  default     = false
}

variable "instance_type" {
  type        = string
  description = "EC2 instance type of the training instances."
  default     = "m6i.xlarge"
}

variable "ami_id" {
  type        = string
  description = "AMI of the training instances. Null (default) uses the latest Ubuntu 24.04 LTS amd64 image published by Canonical in SSM. The startup script expects a Debian/Ubuntu image (apt, systemd, python3)."
  default     = null
}

variable "root_device_name" {
  type        = string
  description = "Root device name of the AMI (\"/dev/sda1\" for Ubuntu images)."
  default     = "/dev/sda1"
}

variable "root_volume_size_gb" {
  type        = number
  description = "Size of the encrypted gp3 root volume, in GiB (local checkpoint staging lives there)."
  default     = 50

  validation {
    condition     = var.root_volume_size_gb >= 16 && var.root_volume_size_gb <= 16384
    error_message = "root_volume_size_gb must be between 16 and 16384."
  }
}

variable "spot_max_price" {
  type        = string
  description = "Maximum hourly Spot price in USD, as a string. Null (default) caps at the On-Demand price."
  default     = null
}

variable "pip_packages" {
  type        = list(string)
  description = "Packages installed with pip into /opt/cloudckpt/venv before training starts."
  default     = ["cloudckpt", "s3fs", "tensorflow-cpu"]

  validation {
    condition     = length(var.pip_packages) > 0 && alltrue([for p in var.pip_packages : !strcontains(p, "'")])
    error_message = "pip_packages must be a non-empty list of pip requirement specifiers without single quotes."
  }
}

variable "training_script" {
  type        = string
  description = "Contents of the Python training script run by the cloudckpt-train systemd unit. Null (default) uses examples/trainer/train.py, which trains a toy model with cloudckpt.CheckpointSaverHook(checkpoint_dir, save_steps=..., preemption=\"auto\")."
  default     = null
}

variable "save_steps" {
  type        = number
  description = "Steps between checkpoints (CLOUDCKPT_SAVE_STEPS for the training script)."
  default     = 500

  validation {
    condition     = var.save_steps >= 1
    error_message = "save_steps must be at least 1."
  }
}

variable "max_steps" {
  type        = number
  description = "Global step at which training stops (CLOUDCKPT_MAX_STEPS for the training script)."
  default     = 100000
}

variable "tags" {
  type        = map(string)
  description = "Tags applied to every resource through the provider's default_tags."
  default     = { project = "cloudckpt" }
}
