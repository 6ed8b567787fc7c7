variable "project_id" {
  type        = string
  description = "Google Cloud project for the bucket, the service account and the instance template."
}

variable "region" {
  type        = string
  description = "Region of the instance template's subnetwork and of the bucket (same region avoids cross-region transfer charges)."
  default     = "us-central1"

  validation {
    condition     = can(regex("^[a-z]+-[a-z]+[0-9]$", var.region))
    error_message = "region must look like \"us-central1\"."
  }
}

variable "name" {
  type        = string
  description = "Name stem for the instance template and the VM labels."
  default     = "cloudckpt-demo"

  validation {
    condition     = can(regex("^[a-z]([a-z0-9-]{0,30}[a-z0-9])?$", var.name))
    error_message = "name must be 1-32 lowercase letters, digits or hyphens, starting with a letter."
  }
}

variable "bucket_name" {
  type        = string
  description = "Globally unique name of the checkpoint bucket to create."
}

variable "run_prefix" {
  type        = string
  description = "Object name prefix of this training run inside the bucket, without leading or trailing slash."
  default     = "runs/demo"
}

variable "service_account_id" {
  type        = string
  description = "account_id of the training service account created by the module."
  default     = "cloudckpt-training"
}

variable "subnetwork" {
  type        = string
  description = "Self link or name of the subnetwork for the VMs, in var.region. The VMs have no external IP, so the subnetwork needs Cloud NAT (to install packages from PyPI) and Private Google Access (to reach Cloud Storage)."
}

variable "machine_type" {
  type        = string
  description = "Machine type of the training VMs."
  default     = "n2-standard-4"
}

variable "source_image" {
  type        = string
  description = "Boot image. The startup script expects a Debian/Ubuntu image (apt, systemd, python3)."
  default     = "debian-cloud/debian-12"
}

variable "boot_disk_size_gb" {
  type        = number
  description = "Boot disk size in GB (local checkpoint staging lives there)."
  default     = 50

  validation {
    condition     = var.boot_disk_size_gb >= 10 && var.boot_disk_size_gb <= 65536
    error_message = "boot_disk_size_gb must be between 10 and 65536."
  }
}

variable "termination_action" {
  type        = string
  description = "What Compute Engine does with a preempted Spot VM: \"STOP\" keeps the VM (start it again to resume from the last checkpoint), \"DELETE\" removes it (a managed instance group recreates it)."
  default     = "STOP"

  validation {
    condition     = contains(["STOP", "DELETE"], var.termination_action)
    error_message = "termination_action must be \"STOP\" or \"DELETE\"."
  }
}

variable "pip_packages" {
  type        = list(string)
  description = "Packages installed with pip into /opt/cloudckpt/venv before training starts."
  default     = ["cloudckpt", "gcsfs", "tensorflow-cpu"]

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

variable "labels" {
  type        = map(string)
  description = "Labels for the bucket and the VMs."
  default     = { project = "cloudckpt" }
}
