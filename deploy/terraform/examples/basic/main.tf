# A 3-node filch test cluster in eu-west-1, then Ansible:
#
#   terraform init && terraform apply -var 'ssh_cidr_blocks=["203.0.113.7/32"]'
#   terraform output -raw ansible_inventory > inventory.yml
#   ansible-playbook -i inventory.yml ../../../site.yml
terraform {
  required_version = ">= 1.3.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0, < 7.0"
    }
  }
}

provider "aws" {
  region = var.region
}

variable "region" {
  type        = string
  description = "AWS region of the test cluster."
  default     = "eu-west-1"
}

variable "ssh_cidr_blocks" {
  type        = list(string)
  description = "Where Ansible connects from (SSH), e.g. [\"203.0.113.7/32\"]."
}

variable "ssh_public_key_file" {
  type        = string
  description = "Path of the OpenSSH public key to log in with."
  default     = "~/.ssh/id_ed25519.pub"
}

module "filch" {
  source = "../.."

  name            = "filch-test"
  node_count      = 3
  instance_type   = "t3.medium"
  ssh_cidr_blocks = var.ssh_cidr_blocks
  ssh_public_key  = file(pathexpand(var.ssh_public_key_file))

  ansible_group_vars = {
    filch_node_cpus   = "2"
    filch_node_memory = "3Gi"
  }

  tags = {
    Environment = "test"
  }
}
