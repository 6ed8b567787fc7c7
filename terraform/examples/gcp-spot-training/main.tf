# Spot training on Compute Engine with checkpoints in Cloud Storage.
#
# `terraform apply` creates the checkpoint bucket and the training service
# account (module) and a Spot VM instance template. Start a VM with
#   gcloud compute instances create trainer-1 --zone <zone> \
#     --source-instance-template <instance_template_self_link>
# or a managed instance group. Every boot installs cloudckpt (first boot
# only) and (re)starts training, which resumes from the latest checkpoint.

module "checkpoints" {
  source = "../../modules/gcp-checkpoint-bucket"

  project_id         = var.project_id
  bucket_name        = var.bucket_name
  location           = var.region
  run_prefix         = var.run_prefix
  service_account_id = var.service_account_id
  labels             = var.labels
}

locals {
  training_script = coalesce(var.training_script, file("${path.module}/../trainer/train.py"))

  startup_script = templatefile("${path.module}/templates/startup.sh.tftpl", {
    checkpoint_dir      = module.checkpoints.checkpoint_dir
    pip_packages        = join(" ", [for p in var.pip_packages : "'${p}'"])
    training_script_b64 = base64encode(local.training_script)
    save_steps          = var.save_steps
    max_steps           = var.max_steps
  })
}

resource "google_compute_instance_template" "training" {
  name_prefix  = "${var.name}-"
  description  = "cloudckpt Spot training, checkpoints to ${module.checkpoints.checkpoint_dir}"
  machine_type = var.machine_type
  labels       = var.labels

  disk {
    source_image = var.source_image
    disk_size_gb = var.boot_disk_size_gb
    disk_type    = "pd-balanced"
    boot         = true
    auto_delete  = true
  }

  # No access_config: the VMs get no external IP. The subnetwork provides
  # egress through Cloud NAT (PyPI) and Private Google Access (Cloud Storage).
  network_interface {
    subnetwork = var.subnetwork
  }

  # Spot: up to 91% cheaper, preempted with a 30 s notice. The shutdown
  # script below turns that notice into a SIGTERM for the trainer.
  scheduling {
    provisioning_model          = "SPOT"
    preemptible                 = true
    automatic_restart           = false
    on_host_maintenance         = "TERMINATE"
    instance_termination_action = var.termination_action
  }

  # The module's service account: objectUser on gs://<bucket>/<run_prefix>/
  # only. The cloud-platform scope defers all access decisions to IAM.
  service_account {
    email  = module.checkpoints.service_account_email
    scopes = ["cloud-platform"]
  }

  shielded_instance_config {
    enable_secure_boot          = true
    enable_vtpm                 = true
    enable_integrity_monitoring = true
  }

  metadata = {
    startup-script         = local.startup_script
    shutdown-script        = file("${path.module}/templates/shutdown.sh")
    block-project-ssh-keys = "true"
    enable-oslogin         = "TRUE"
  }

  lifecycle {
    create_before_destroy = true
  }
}
