# Spot training on EC2 with checkpoints in S3.
#
# `terraform apply` creates the checkpoint bucket (module), an instance
# profile allowed to touch only this run's prefix, an egress-only security
# group and a Spot launch template. Start instances from the template with
#   aws ec2 run-instances --launch-template LaunchTemplateId=<id>
# or an Auto Scaling group; every instance installs cloudckpt and resumes the
# run from the latest checkpoint.

module "checkpoints" {
  source = "../../modules/aws-checkpoint-bucket"

  bucket_name             = var.bucket_name
  run_prefix              = var.run_prefix
  name                    = var.name
  create_instance_profile = true
  create_managed_policy   = false
}

# Latest Ubuntu 24.04 LTS, unless an AMI is given.
data "aws_ssm_parameter" "ubuntu" {
  count = var.ami_id == null ? 1 : 0

  name = "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"
}

locals {
  # Canonical's published AMI ID is public, hence insecure_value (not sensitive).
  ami_id          = coalesce(var.ami_id, one(data.aws_ssm_parameter.ubuntu[*].insecure_value))
  training_script = coalesce(var.training_script, file("${path.module}/../trainer/train.py"))

  user_data = templatefile("${path.module}/templates/user_data.sh.tftpl", {
    checkpoint_dir      = module.checkpoints.checkpoint_dir
    pip_packages        = join(" ", [for p in var.pip_packages : "'${p}'"])
    training_script_b64 = base64encode(local.training_script)
    save_steps          = var.save_steps
    max_steps           = var.max_steps
  })
}

# No inbound rules at all (use SSM Session Manager to get a shell); outbound
# HTTPS for PyPI and S3, HTTP for the distribution's package mirrors.
resource "aws_security_group" "training" {
  name        = "${var.name}-training"
  description = "cloudckpt training instances: no inbound, outbound HTTP(S) only"
  vpc_id      = var.vpc_id

  egress {
    description = "HTTPS: PyPI and S3 (checkpoints)"
    protocol    = "tcp"
    from_port   = 443
    to_port     = 443
    cidr_blocks = ["0.0.0.0/0"]
  }

  egress {
    description = "HTTP: apt package mirrors"
    protocol    = "tcp"
    from_port   = 80
    to_port     = 80
    cidr_blocks = ["0.0.0.0/0"]
  }
}

resource "aws_launch_template" "training" {
  name_prefix            = "${var.name}-"
  description            = "cloudckpt Spot training, checkpoints to ${module.checkpoints.checkpoint_dir}"
  image_id               = local.ami_id
  instance_type          = var.instance_type
  ebs_optimized          = true
  update_default_version = true
  user_data              = base64encode(local.user_data)

  iam_instance_profile {
    arn = module.checkpoints.instance_profile_arn
  }

  instance_market_options {
    market_type = "spot"

    spot_options {
      spot_instance_type             = "one-time"
      instance_interruption_behavior = "terminate"
      max_price                      = var.spot_max_price
    }
  }

  # IMDSv2 only; hop limit 1 keeps the instance credentials away from
  # containers. cloudckpt's preemption="auto" polls
  # /latest/meta-data/spot/instance-action through IMDSv2.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "disabled"
  }

  block_device_mappings {
    device_name = var.root_device_name

    ebs {
      volume_size           = var.root_volume_size_gb
      volume_type           = "gp3"
      encrypted             = true
      delete_on_termination = true
    }
  }

  network_interfaces {
    subnet_id                   = var.subnet_id
    security_groups             = [aws_security_group.training.id]
    associate_public_ip_address = var.associate_public_ip_address
    delete_on_termination       = true
  }

  monitoring {
    enabled = true
  }

  tag_specifications {
    resource_type = "instance"
    tags          = { Name = "${var.name}-training" }
  }

  tag_specifications {
    resource_type = "volume"
    tags          = { Name = "${var.name}-training" }
  }
}
